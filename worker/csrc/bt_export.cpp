// Writes a state dict the way Python's `torch.save` does, through libtorch's own pickler and zip
// writer, so `torch.load(path)` (weights_only, the default) returns a plain {name: Tensor} dict
// that `module.load_state_dict` takes. tch only writes TorchScript archives, which torch.load
// cannot read as a state dict; `torch::pickle_save` tags the dict with a TorchScript type
// (`torch.jit._pickle.restore_type_tag`), which weights_only loading refuses, so the pickler runs
// here with type tags off. Errors as in bt_error.h.
#include <string>
#include <vector>

#include <ATen/ATen.h>
#include <ATen/core/Dict.h>
#include <caffe2/serialize/inline_container.h>
#include <torch/csrc/jit/serialization/export.h>
#include <torch/csrc/jit/serialization/pickler.h>

#include "bt_error.h"

extern "C" {

// Saves `n` tensors under `names` (in this order) as a dict to `path` (overwritten).
char* bt_pickle_save_dict(const char* const* names, at::Tensor* const* tensors, int n,
                          const char* path) {
  return bt_guarded([&] {
    TORCH_CHECK(n >= 0, "negative tensor count ", n);
    c10::Dict<std::string, at::Tensor> dict;
    for (int i = 0; i < n; ++i) {
      dict.insert(std::string(names[i]), *tensors[i]);
    }
    std::vector<char> pickle;
    torch::jit::Pickler pickler(
        [&](const char* buf, size_t size) { pickle.insert(pickle.end(), buf, buf + size); },
        /*tensor_table=*/nullptr, /*type_renamer=*/nullptr, /*memoized_class_types=*/nullptr,
        /*get_tensor_id=*/nullptr, /*tag_aggregates=*/false);
    pickler.protocol();
    pickler.pushIValue(c10::IValue(dict));
    pickler.stop();
    caffe2::serialize::PyTorchStreamWriter writer{std::string(path)};
    torch::jit::writeArchiveAndTensors("data", pickle.data(), pickle.size(), pickler.tensorData(),
                                       writer);
    writer.writeEndOfFile();
  });
}

}  // extern "C"
