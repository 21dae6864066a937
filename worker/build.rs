//! Build script: gives the binaries an rpath to libtorch so they run without LD_LIBRARY_PATH,
//! and compiles the c10d shim (`csrc/bt_dist.cpp`) against libtorch's headers.
//!
//! Where things come from (the same sources torch-sys uses):
//! - libtorch's lib dir: `DEP_TCH_LIBTORCH_LIB`, exported by torch-sys (`links = "tch"`).
//! - headers: `$LIBTORCH_INCLUDE/include` if set, else `<lib dir>/../include` (both the pip wheel,
//!   `torch/{lib,include}`, and a libtorch zip, `libtorch/{lib,include}`, have this layout).
//! - C++ ABI: with `LIBTORCH_USE_PYTORCH`, asked from the Python torch
//!   (`torch._C._GLIBCXX_USE_CXX11_ABI`); otherwise `LIBTORCH_CXX11_ABI`, default 1.
//! - gloo: the wheel ships no gloo headers; `csrc/gloo_decl/` holds declaration-only stand-ins.
//!   Never link a separate libgloo: libtorch_cpu exports gloo's symbols.
//! - feature `nccl`: `nccl.h` and the CUDA runtime headers from the wheel's `nvidia/*` packages
//!   next to `torch/` (override with `BT_NCCL_INCLUDE` / `BT_CUDA_INCLUDE`, `:`-separated).
use std::env;
use std::path::{Path, PathBuf};
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=csrc");
    for var in [
        "LIBTORCH_USE_PYTORCH",
        "LIBTORCH_CXX11_ABI",
        "LIBTORCH_INCLUDE",
        "BT_NCCL_INCLUDE",
        "BT_CUDA_INCLUDE",
    ] {
        println!("cargo:rerun-if-env-changed={var}");
    }
    let lib = match env::var("DEP_TCH_LIBTORCH_LIB") {
        Ok(lib) => PathBuf::from(lib),
        Err(_) => panic!(
            "DEP_TCH_LIBTORCH_LIB is not set: torch-sys must be a direct dependency of bt-worker \
             (source scripts/env.sh before building)"
        ),
    };
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());

    let root = match env::var("LIBTORCH_INCLUDE") {
        Ok(dir) => PathBuf::from(dir),
        Err(_) => lib
            .parent()
            .expect("libtorch lib dir has a parent")
            .to_path_buf(),
    };
    let include = root.join("include");
    let header = include.join("torch/csrc/distributed/c10d/ProcessGroupGloo.hpp");
    if !header.exists() {
        panic!(
            "c10d headers not found at {} (set LIBTORCH_INCLUDE to the directory holding include/)",
            header.display()
        );
    }
    let abi = cxx11_abi();

    let mut build = cc::Build::new();
    build
        .cpp(true)
        .std("c++17")
        .file("csrc/bt_dist.cpp")
        .file("csrc/bt_amp.cpp")
        .file("csrc/bt_export.cpp")
        .file("csrc/bt_optim.cpp")
        .include("csrc/gloo_decl")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .define("_GLIBCXX_USE_CXX11_ABI", abi.as_str())
        .define("USE_C10D_GLOO", None)
        .warnings(false)
        // The same code in every profile: the dev profile's opt-level 1 would otherwise reach the
        // shim, and the fused LARS at -O1 is slower than the per-tensor ops it replaces. No
        // fast-math at any level, so the results are the same bits as at -O1.
        .opt_level(3)
        .flag_if_supported("-Wno-deprecated-declarations")
        // The fused optimizer matches the per-tensor ops' rounding: no contracted multiply-adds.
        .flag_if_supported("-ffp-contract=off");

    let nccl = env::var_os("CARGO_FEATURE_NCCL").is_some();
    if nccl {
        let site = lib
            .parent()
            .and_then(Path::parent)
            .map(Path::to_path_buf)
            .unwrap_or_default();
        let nccl_inc = include_dirs("BT_NCCL_INCLUDE", vec![site.join("nvidia/nccl/include")]);
        let cuda_inc = include_dirs(
            "BT_CUDA_INCLUDE",
            vec![
                site.join("nvidia/cu13/include"),
                site.join("nvidia/cu13/include/cccl"),
                site.join("nvidia/cuda_runtime/include"),
            ],
        );
        for dir in nccl_inc.iter().chain(cuda_inc.iter()) {
            build.include(dir);
        }
        build.define("USE_C10D_NCCL", None).define("USE_CUDA", None);
    }
    build.compile("bt_dist");

    // After the shim, so the linker resolves its references.
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    if nccl {
        // --as-needed would drop libtorch_cuda, and then nothing registers the CUDA backend.
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
        println!("cargo:rustc-link-arg=-ltorch_cuda");
        println!("cargo:rustc-link-arg=-lc10_cuda");
        println!("cargo:rustc-link-arg=-Wl,--as-needed");
    }
}

fn include_dirs(var: &str, defaults: Vec<PathBuf>) -> Vec<PathBuf> {
    match env::var(var) {
        Ok(v) => env::split_paths(&v).collect(),
        Err(_) => defaults.into_iter().filter(|d| d.exists()).collect(),
    }
}

fn cxx11_abi() -> String {
    if env::var_os("LIBTORCH_USE_PYTORCH").is_some() {
        let python = if env::var_os("VIRTUAL_ENV").is_some() {
            "python"
        } else {
            "python3"
        };
        let out = Command::new(python)
            .args([
                "-c",
                "import torch; print(int(torch._C._GLIBCXX_USE_CXX11_ABI))",
            ])
            .output();
        match out {
            Ok(o) if o.status.success() => {
                let v = String::from_utf8_lossy(&o.stdout).trim().to_string();
                if v == "0" || v == "1" {
                    return v;
                }
                panic!("unexpected C++ ABI answer from {python}: {v:?}");
            }
            Ok(o) => panic!(
                "{python} could not report torch's C++ ABI: {}",
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => panic!("running {python} to query torch's C++ ABI: {e}"),
        }
    }
    env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned())
}
