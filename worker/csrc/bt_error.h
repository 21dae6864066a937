// Error convention shared by the shims: every extern "C" entry point runs its body through
// bt_guarded, which catches every C++ exception and returns it as a malloc'd message (NULL on
// success); Rust frees it with bt_dist_free_error.
#pragma once
#include <cstdlib>
#include <cstring>
#include <exception>
#include <string>

#include <c10/util/Exception.h>

inline char* bt_dup_error(const std::string& s) {
  char* out = static_cast<char*>(std::malloc(s.size() + 1));
  if (out != nullptr) {
    std::memcpy(out, s.c_str(), s.size() + 1);
  }
  return out;
}

template <typename F>
char* bt_guarded(F&& f) {
  try {
    f();
    return nullptr;
  } catch (const c10::Error& e) {
    return bt_dup_error(e.what_without_backtrace());
  } catch (const std::exception& e) {
    return bt_dup_error(e.what());
  } catch (...) {
    return bt_dup_error("unknown C++ exception");
  }
}
