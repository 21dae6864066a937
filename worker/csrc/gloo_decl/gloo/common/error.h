// bt: declaration-only stand-in for <gloo/common/error.h> (nothing needed by ProcessGroupGloo.hpp).
// This comment differs from algorithm.h's on purpose: GCC's #pragma once treats identical files
// as one file.
#pragma once
