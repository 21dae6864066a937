// bt mixed-precision and layout helpers that tch does not expose: autocast on a chosen device
// type with a chosen low-precision dtype (tch's `autocast` only toggles CUDA autocast with its
// default fp16), and channels-last conversion. Errors as in bt_error.h.
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

#include <ATen/ATen.h>
#include <ATen/autocast_mode.h>

#include "bt_error.h"

namespace {

at::DeviceType device_type(int code) {
  TORCH_CHECK(code == 0 || code == 1, "unknown device type code ", code);
  return code == 0 ? at::kCPU : at::kCUDA;
}

}  // namespace

extern "C" {

// Enables autocast with `dtype` (0 = bfloat16, 1 = float16) for `device` (0 = CPU, 1 = CUDA) on
// this thread; returns the previous state in prev_enabled / prev_dtype for bt_autocast_exit.
char* bt_autocast_enter(int device, int dtype, int* prev_enabled, int* prev_dtype) {
  return bt_guarded([&] {
    TORCH_CHECK(dtype == 0 || dtype == 1, "unknown autocast dtype code ", dtype);
    at::DeviceType dt = device_type(device);
    *prev_enabled = at::autocast::is_autocast_enabled(dt) ? 1 : 0;
    *prev_dtype = static_cast<int>(at::autocast::get_autocast_dtype(dt));
    at::autocast::set_autocast_dtype(dt, dtype == 0 ? at::kBFloat16 : at::kHalf);
    at::autocast::set_autocast_enabled(dt, true);
    at::autocast::increment_nesting();
  });
}

// Restores the state bt_autocast_enter saved; clears the cast-weight cache on the outermost exit.
char* bt_autocast_exit(int device, int prev_enabled, int prev_dtype) {
  return bt_guarded([&] {
    at::DeviceType dt = device_type(device);
    if (at::autocast::decrement_nesting() == 0) {
      at::autocast::clear_cache();
    }
    at::autocast::set_autocast_enabled(dt, prev_enabled != 0);
    at::autocast::set_autocast_dtype(dt, static_cast<at::ScalarType>(prev_dtype));
  });
}

int bt_autocast_is_enabled(int device) {
  try {
    return at::autocast::is_autocast_enabled(device_type(device)) ? 1 : 0;
  } catch (...) {
    return 0;
  }
}

// A channels-last copy of a 4-D tensor (the tensor itself when it already is); keeps autograd.
char* bt_to_channels_last(at::Tensor* t, at::Tensor** out) {
  *out = nullptr;
  return bt_guarded([&] {
    TORCH_CHECK(t->dim() == 4, "channels-last needs a 4-d tensor, got ", t->dim(), " dimensions");
    *out = new at::Tensor(t->contiguous(at::MemoryFormat::ChannelsLast));
  });
}

int bt_is_channels_last(at::Tensor* t) {
  try {
    return t->dim() == 4 && t->is_contiguous(at::MemoryFormat::ChannelsLast) ? 1 : 0;
  } catch (...) {
    return 0;
  }
}

}  // extern "C"
