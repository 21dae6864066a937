// bt: declaration-only stand-in for <gloo/transport/device.h>: forward declarations only, used
// through smart pointers by ProcessGroupGloo.hpp.
#pragma once

namespace gloo {
namespace transport {
class Device;
class UnboundBuffer;
} // namespace transport
} // namespace gloo
