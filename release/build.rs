//! Records the target triple these tools were built for: `publish` labels artifacts with
//! it by default (as the upgrader's build records the triple it picks artifacts for).

fn main() {
    let target = std::env::var("TARGET").unwrap_or_default();
    println!("cargo:rustc-env=DELEGATE_RELEASE_TARGET={target}");
    println!("cargo:rerun-if-changed=build.rs");
}
