//! Build script: gives the binaries an rpath to libtorch so they run without LD_LIBRARY_PATH,
//! and compiles the c10d shim (see `csrc/`).
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
}
