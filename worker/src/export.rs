//! Weight export (`btctl export`): a checkpoint's backbone, and on request its projector, as a
//! state dict a PyTorch user loads as it is:
//!
//! - `.safetensors`: plain torchvision keys (`conv1.weight`, `layer1.0.bn1.running_mean`, ...), no
//!   `backbone.` prefix; the projector's keys keep theirs (`projector.0.weight`, ...).
//! - `.pth` / `.pt`: the same mapping written by libtorch's own pickler (`torch::pickle_save`, see
//!   `csrc/bt_export.cpp`), which is the format of Python's `torch.save`, so `torch.load` returns a
//!   `{name: Tensor}` dict for `load_state_dict`.
//!
//! The checkpoint is verified first (every file's size and sha256 against `meta.json`); a corrupt
//! one is refused with its path. The output is written to a temporary file next to it and renamed,
//! so a failed export leaves no partial file.
use std::ffi::{c_char, c_int, CString};
use std::path::{Path, PathBuf};

use tch::Tensor;
use torch_sys::C_tensor;

use crate::checkpoint::{self, CheckpointMeta};
use crate::dist::ffi_take_error;
use crate::model::{self, Arch};
use crate::{Error, Result};

extern "C" {
    fn bt_pickle_save_dict(
        names: *const *const c_char,
        tensors: *const *mut C_tensor,
        n: c_int,
        path: *const c_char,
    ) -> *mut c_char;
}

/// The file format, chosen by the output's extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExportFormat {
    Safetensors,
    /// PyTorch's `torch.save` format.
    Pth,
}

impl ExportFormat {
    pub fn from_path(path: &Path) -> Result<Self> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("safetensors") => Ok(ExportFormat::Safetensors),
            Some("pth") | Some("pt") => Ok(ExportFormat::Pth),
            _ => Err(Error::Config(format!(
                "{}: the output must end in .safetensors, .pth or .pt",
                path.display()
            ))),
        }
    }
}

/// What an export wrote.
#[derive(Debug, Clone)]
pub struct ExportSummary {
    pub path: PathBuf,
    pub format: ExportFormat,
    pub tensors: usize,
    /// Elements over every exported tensor.
    pub elements: i64,
    pub with_projector: bool,
    pub meta: CheckpointMeta,
}

impl ExportSummary {
    /// A PyTorch snippet that loads the export into a stock torchvision model (or says why the
    /// architecture is not a torchvision one).
    pub fn snippet(&self) -> String {
        let cfg = &self.meta.model_config;
        let arch = match cfg.backbone {
            Arch::Resnet18 => "resnet18",
            Arch::Resnet34 => "resnet34",
            Arch::Resnet50 => "resnet50",
        };
        let path = self.path.display().to_string().replace('"', "\\\"");
        let load = match self.format {
            ExportFormat::Pth => format!("sd = torch.load(\"{path}\")"),
            ExportFormat::Safetensors => {
                format!("from safetensors.torch import load_file; sd = load_file(\"{path}\")")
            }
        };
        let stem = if cfg.cifar_stem {
            format!(
                "m.conv1 = torch.nn.Conv2d(3, {}, 3, {}, 1, bias=False); \
                 m.maxpool = torch.nn.Identity(); ",
                cfg.width, cfg.stem_stride
            )
        } else {
            String::new()
        };
        let backbone_only = if self.with_projector {
            "sd = {k: v for k, v in sd.items() if not k.startswith(\"projector.\")}; "
        } else {
            ""
        };
        let python = format!(
            "import torch, torchvision; {load}; {backbone_only}m = torchvision.models.{arch}(); \
             {stem}m.fc = torch.nn.Identity(); m.load_state_dict(sd)"
        );
        if cfg.width == 64 {
            python
        } else {
            format!(
                "# model.width = {} is not a torchvision layout (64 is): load the keys into a \
                 ResNet whose layer k has {}·2^(k-1) channels; the key names are torchvision's.\n{}",
                cfg.width, cfg.width, python
            )
        }
    }
}

/// Exports the checkpoint in `ckpt` to `out` (format from the extension).
pub fn export_checkpoint(ckpt: &Path, out: &Path, with_projector: bool) -> Result<ExportSummary> {
    let format = ExportFormat::from_path(out)?;
    let meta = checkpoint::verify(ckpt)?;
    let all = model::read_safetensors(&ckpt.join(checkpoint::MODEL_FILE))?;
    let mut named: Vec<(String, Tensor)> = all
        .into_iter()
        .filter_map(|(k, t)| {
            if let Some(bare) = k.strip_prefix("backbone.") {
                Some((bare.to_string(), t))
            } else if with_projector && k.starts_with("projector.") {
                Some((k, t))
            } else {
                None
            }
        })
        .collect();
    if named.is_empty() {
        return Err(Error::Checkpoint {
            path: ckpt.to_path_buf(),
            message: "no backbone.* tensors in the model file".into(),
        });
    }
    named.sort_by(|a, b| a.0.cmp(&b.0));
    let tmp = temp_path(out);
    let written = match format {
        ExportFormat::Safetensors => {
            Tensor::write_safetensors(&named, &tmp).map_err(|e| Error::Checkpoint {
                path: tmp.clone(),
                message: format!("writing safetensors: {e}"),
            })
        }
        ExportFormat::Pth => pickle_save(&named, &tmp),
    };
    let renamed = written.and_then(|()| {
        std::fs::rename(&tmp, out).map_err(|e| Error::Checkpoint {
            path: out.to_path_buf(),
            message: format!("moving the export into place: {e}"),
        })
    });
    if let Err(e) = renamed {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    Ok(ExportSummary {
        path: out.to_path_buf(),
        format,
        tensors: named.len(),
        elements: named.iter().map(|(_, t)| t.numel() as i64).sum(),
        with_projector,
        meta,
    })
}

fn temp_path(out: &Path) -> PathBuf {
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    out.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

/// Writes `named` (CPU tensors) as a `torch.save`-format dict.
pub fn pickle_save(named: &[(String, Tensor)], path: &Path) -> Result<()> {
    let names = named
        .iter()
        .map(|(n, _)| CString::new(n.as_str()))
        .collect::<std::result::Result<Vec<_>, _>>()
        .map_err(|e| Error::Config(format!("tensor name with a NUL byte: {e}")))?;
    let name_ptrs: Vec<*const c_char> = names.iter().map(|c| c.as_ptr()).collect();
    let cpu = named
        .iter()
        .map(|(_, t)| {
            t.f_detach()?
                .f_to_device(tch::Device::Cpu)?
                .f_contiguous()
                .map_err(Error::from)
        })
        .collect::<Result<Vec<Tensor>>>()?;
    let tensor_ptrs: Vec<*mut C_tensor> = cpu.iter().map(|t| t.as_ptr() as *mut C_tensor).collect();
    let c_path = CString::new(path.as_os_str().to_string_lossy().as_bytes())
        .map_err(|e| Error::Config(format!("{}: {e}", path.display())))?;
    let n = c_int::try_from(named.len())
        .map_err(|_| Error::Config(format!("{} tensors: too many", named.len())))?;
    // SAFETY: `names`, `cpu` and `c_path` outlive the call; the shim only reads them.
    let err = unsafe {
        bt_pickle_save_dict(name_ptrs.as_ptr(), tensor_ptrs.as_ptr(), n, c_path.as_ptr())
    };
    ffi_take_error(err, &format!("writing {}", path.display()), Error::Other)
}
