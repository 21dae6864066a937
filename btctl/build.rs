//! Gives btctl an rpath to libtorch (it links bt-worker for `btctl export`), so it runs without
//! LD_LIBRARY_PATH; torch-sys exports the lib dir as DEP_TCH_LIBTORCH_LIB.
fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath,{lib}");
    }
}
