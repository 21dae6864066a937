// bt: declaration-only stand-in for <gloo/context.h>. Only the declaration used by an inline
// method of ProcessGroupGloo; the shim must not call it (the real class has more members).
#pragma once

#include <chrono>

namespace gloo {
class Context {
 public:
  void setTimeout(std::chrono::milliseconds timeout);
};
} // namespace gloo
