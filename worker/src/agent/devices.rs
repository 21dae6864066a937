//! The devices a daemon offers, and whether its node is healthy.
//!
//! The truth is what CUDA reports (`tch::Cuda::device_count()`), never a fixed count. A node
//! expected to have GPUs (`gpus = N`, or `NVIDIA_VISIBLE_DEVICES` naming devices, as the NVIDIA
//! device plugin sets it for a pod that asked for `nvidia.com/gpu`) where CUDA finds none (or,
//! with `gpus = N`, another number) is **unhealthy**: the daemon registers with that reason and no
//! device, and the coordinator places nothing on it. It never falls back to CPU slots: a GPU-mode
//! daemon offers GPUs only. Without any expectation it offers every CUDA device, or `cpu_slots`
//! CPU slots when there is none; `gpus = 0` makes a CPU daemon whatever the node has.
use std::path::Path;

use bt_proto::{Device, DeviceKind};

/// What the configuration and the environment say about this node's GPUs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuExpectation {
    /// Nothing: CUDA devices if there are any, else CPU slots.
    Auto,
    /// `gpus = 0`: a CPU daemon (`cpu_slots`), CUDA devices ignored.
    CpuOnly,
    /// `gpus = N`: exactly this many.
    Exactly(u32),
    /// At least one; `source` says what expects them (an environment variable).
    Any { source: String },
}

impl GpuExpectation {
    /// From the `gpus` setting, else `NVIDIA_VISIBLE_DEVICES` (its value): unset, empty, `void`
    /// and `none` expect nothing; `all`, a list of indices or UUIDs, or any other value (the
    /// device plugin's volume-mounts strategy) expect at least one GPU.
    pub fn from(gpus: Option<u32>, nvidia_visible_devices: Option<&str>) -> GpuExpectation {
        match gpus {
            Some(0) => return GpuExpectation::CpuOnly,
            Some(n) => return GpuExpectation::Exactly(n),
            None => {}
        }
        match nvidia_visible_devices.map(str::trim) {
            None | Some("") | Some("void") | Some("none") => GpuExpectation::Auto,
            Some(v) => GpuExpectation::Any {
                source: format!("NVIDIA_VISIBLE_DEVICES={v}"),
            },
        }
    }

    /// Whether this daemon must offer GPUs (and never CPU slots).
    pub fn gpu_mode(&self) -> bool {
        matches!(
            self,
            GpuExpectation::Exactly(_) | GpuExpectation::Any { .. }
        )
    }
}

/// What CUDA (through libtorch) and the node say, for the decision and its reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CudaProbe {
    /// `tch::Cuda::device_count()`.
    pub count: u32,
    /// libtorch's CUDA backend is in this binary (`at::hasCUDA()`): without it no GPU is ever
    /// seen, whatever the node has.
    pub backend: bool,
    /// The NVIDIA kernel driver's version line (`/proc/driver/nvidia/version`), if loaded.
    pub driver: Option<String>,
    /// `/dev/nvidia<N>` device nodes present in this container.
    pub device_nodes: u32,
}

impl CudaProbe {
    /// Asks libtorch and looks at the node.
    pub fn probe() -> CudaProbe {
        let backend = tch::utils::has_cuda();
        let count = u32::try_from(tch::Cuda::device_count().max(0)).unwrap_or(0);
        CudaProbe {
            count,
            backend,
            driver: std::fs::read_to_string("/proc/driver/nvidia/version")
                .ok()
                .and_then(|s| s.lines().next().map(|l| l.trim().to_string()))
                .filter(|l| !l.is_empty()),
            device_nodes: count_device_nodes(Path::new("/dev")),
        }
    }

    /// Why CUDA finds no (or too few) devices, as far as this node shows.
    fn diagnosis(&self) -> String {
        let mut why = Vec::new();
        if !self.backend {
            why.push(
                "this bt-worker has no CUDA backend (libtorch_cuda not linked: build it with \
                 --features bt-worker/nccl, as the GPU image is)"
                    .to_string(),
            );
        }
        match &self.driver {
            Some(v) => why.push(format!("driver: {v}")),
            None => why.push(
                "no NVIDIA driver is loaded (/proc/driver/nvidia/version is missing)".to_string(),
            ),
        }
        if self.device_nodes == 0 {
            why.push(
                "no /dev/nvidia<N> device node in this container (is the NVIDIA container \
                 runtime in use?)"
                    .to_string(),
            );
        } else {
            why.push(format!(
                "{} /dev/nvidia<N> device node(s)",
                self.device_nodes
            ));
        }
        why.join("; ")
    }
}

/// `/dev/nvidia0`, `/dev/nvidia1`, … (not `nvidiactl`, `nvidia-uvm`).
fn count_device_nodes(dev: &Path) -> u32 {
    let Ok(rd) = std::fs::read_dir(dev) else {
        return 0;
    };
    rd.flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .and_then(|n| n.strip_prefix("nvidia"))
                .is_some_and(|rest| !rest.is_empty() && rest.bytes().all(|b| b.is_ascii_digit()))
        })
        .count() as u32
}

/// The decision: the devices offered, or why the node is unhealthy (then none is offered).
#[derive(Debug, Clone, PartialEq)]
pub struct DevicePlan {
    pub devices: Vec<Device>,
    pub unhealthy: Option<String>,
}

fn cuda_devices(n: u32) -> Vec<Device> {
    (0..n)
        .map(|i| Device {
            index: i,
            kind: "cuda".into(),
            name: format!("cuda:{i}"),
            device_kind: DeviceKind::Cuda as i32,
        })
        .collect()
}

fn cpu_devices(n: u32) -> Vec<Device> {
    (0..n)
        .map(|i| Device {
            index: i,
            kind: "cpu".into(),
            name: format!("cpu-slot-{i}"),
            device_kind: DeviceKind::Cpu as i32,
        })
        .collect()
}

/// What this node offers, given what is expected of it and what CUDA found.
pub fn plan_devices(expect: &GpuExpectation, cuda: &CudaProbe, cpu_slots: u32) -> DevicePlan {
    let healthy = |devices| DevicePlan {
        devices,
        unhealthy: None,
    };
    let unhealthy = |why: String| DevicePlan {
        devices: Vec::new(),
        unhealthy: Some(why),
    };
    match expect {
        GpuExpectation::CpuOnly => healthy(cpu_devices(cpu_slots)),
        GpuExpectation::Auto if cuda.count > 0 => healthy(cuda_devices(cuda.count)),
        GpuExpectation::Auto => healthy(cpu_devices(cpu_slots)),
        GpuExpectation::Exactly(n) if cuda.count == *n => healthy(cuda_devices(*n)),
        GpuExpectation::Exactly(n) if cuda.count == 0 => unhealthy(format!(
            "{n} GPU(s) expected (gpus = {n}) but CUDA does not initialise or finds none: {}",
            cuda.diagnosis()
        )),
        GpuExpectation::Exactly(n) => unhealthy(format!(
            "{n} GPU(s) expected (gpus = {n}) but CUDA finds {}: set gpus to what the node has, \
             or check the missing GPUs ({})",
            cuda.count,
            cuda.diagnosis()
        )),
        GpuExpectation::Any { .. } if cuda.count > 0 => healthy(cuda_devices(cuda.count)),
        GpuExpectation::Any { source } => unhealthy(format!(
            "GPUs expected ({source}) but CUDA does not initialise or finds none: {}",
            cuda.diagnosis()
        )),
    }
}

/// The devices this node offers, from the `gpus` setting, `NVIDIA_VISIBLE_DEVICES` and CUDA.
pub fn detect_devices(gpus: Option<u32>, cpu_slots: u32) -> DevicePlan {
    let env = std::env::var("NVIDIA_VISIBLE_DEVICES").ok();
    let expect = GpuExpectation::from(gpus, env.as_deref());
    plan_devices(&expect, &CudaProbe::probe(), cpu_slots)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(count: u32) -> CudaProbe {
        CudaProbe {
            count,
            backend: true,
            driver: None,
            device_nodes: 0,
        }
    }

    fn kinds(p: &DevicePlan) -> Vec<String> {
        p.devices.iter().map(|d| d.name.clone()).collect()
    }

    #[test]
    fn expectation_comes_from_the_setting_then_the_device_plugin() {
        use GpuExpectation::*;
        assert_eq!(GpuExpectation::from(None, None), Auto);
        for v in ["", "  ", "void", "none"] {
            assert_eq!(GpuExpectation::from(None, Some(v)), Auto, "{v:?}");
        }
        for v in [
            "all",
            "0,1",
            "GPU-8e3f1c2a-0d5b",
            "/var/run/nvidia-container-devices",
        ] {
            let e = GpuExpectation::from(None, Some(v));
            assert!(e.gpu_mode(), "{v:?}: {e:?}");
            assert!(matches!(&e, Any { source } if source.contains(v)), "{e:?}");
        }
        assert_eq!(GpuExpectation::from(Some(0), Some("all")), CpuOnly);
        assert_eq!(GpuExpectation::from(Some(8), None), Exactly(8));
        assert!(!CpuOnly.gpu_mode() && !Auto.gpu_mode());
    }

    #[test]
    fn every_gpu_cuda_finds_is_offered_no_fixed_count() {
        for n in [1, 3, 8, 16] {
            let p = plan_devices(&GpuExpectation::Auto, &probe(n), 4);
            assert_eq!(p.devices.len(), n as usize);
            assert!(p.unhealthy.is_none());
            assert!(p.devices.iter().all(|d| d.kind == "cuda"));
        }
        let p = plan_devices(&GpuExpectation::Exactly(3), &probe(3), 4);
        assert_eq!(kinds(&p), ["cuda:0", "cuda:1", "cuda:2"]);
        let some = GpuExpectation::from(None, Some("all"));
        assert_eq!(plan_devices(&some, &probe(2), 4).devices.len(), 2);
    }

    #[test]
    fn a_cpu_node_offers_its_slots() {
        let p = plan_devices(&GpuExpectation::Auto, &probe(0), 2);
        assert_eq!(kinds(&p), ["cpu-slot-0", "cpu-slot-1"]);
        assert!(p.unhealthy.is_none());
        // gpus = 0: CPU slots even where CUDA sees GPUs.
        let p = plan_devices(&GpuExpectation::CpuOnly, &probe(4), 1);
        assert_eq!(kinds(&p), ["cpu-slot-0"]);
    }

    #[test]
    fn gpus_expected_and_none_found_is_unhealthy_without_a_cpu_slot() {
        let mut cuda = probe(0);
        cuda.backend = false;
        let p = plan_devices(&GpuExpectation::Exactly(8), &cuda, 4);
        assert!(p.devices.is_empty(), "{p:?}");
        let why = p.unhealthy.unwrap();
        assert!(why.contains("8 GPU(s) expected"), "{why}");
        assert!(why.contains("no CUDA backend"), "{why}");
        assert!(why.contains("no NVIDIA driver"), "{why}");
        assert!(why.contains("no /dev/nvidia<N>"), "{why}");

        let env = GpuExpectation::from(None, Some("GPU-1,GPU-2"));
        let cuda = CudaProbe {
            count: 0,
            backend: true,
            driver: Some("NVRM version: NVIDIA UNIX x86_64 Kernel Module  580.95.05".into()),
            device_nodes: 2,
        };
        let p = plan_devices(&env, &cuda, 4);
        assert!(p.devices.is_empty());
        let why = p.unhealthy.unwrap();
        assert!(why.contains("NVIDIA_VISIBLE_DEVICES=GPU-1,GPU-2"), "{why}");
        assert!(
            why.contains("580.95.05") && why.contains("2 /dev/nvidia"),
            "{why}"
        );
        assert!(!why.contains("no CUDA backend"), "{why}");
    }

    #[test]
    fn another_count_than_configured_is_unhealthy() {
        for found in [1, 7, 9] {
            let p = plan_devices(&GpuExpectation::Exactly(8), &probe(found), 4);
            assert!(p.devices.is_empty());
            let why = p.unhealthy.unwrap();
            assert!(why.contains(&format!("CUDA finds {found}")), "{why}");
        }
    }

    #[test]
    fn device_nodes_are_counted_by_name() {
        let d = tempfile::tempdir().unwrap();
        for n in [
            "nvidia0",
            "nvidia1",
            "nvidiactl",
            "nvidia-uvm",
            "nvidia12",
            "null",
        ] {
            std::fs::write(d.path().join(n), "").unwrap();
        }
        assert_eq!(count_device_nodes(d.path()), 3);
        assert_eq!(count_device_nodes(&d.path().join("missing")), 0);
    }

    #[test]
    fn this_machine_probes_without_panicking() {
        // No GPU here: whatever CUDA says, the plan is consistent with it.
        let cuda = CudaProbe::probe();
        let p = plan_devices(&GpuExpectation::Exactly(1), &cuda, 1);
        assert_eq!(p.unhealthy.is_some(), cuda.count != 1);
        assert!(p.devices.iter().all(|d| d.kind == "cuda"));
    }
}
