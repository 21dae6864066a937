// bt: declaration-only stand-in for <gloo/algorithm.h>.
// libtorch_cpu exports gloo's symbols but the wheel ships no gloo headers; ProcessGroupGloo.hpp
// includes this file and needs nothing from it. Do not call gloo inline code from the shim.
#pragma once
