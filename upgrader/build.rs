//! Records the target triple this upgrader was built for: it picks the release artifact
//! for that triple, and `publish` labels artifacts with it by default.

fn main() {
    let target = std::env::var("TARGET").unwrap_or_default();
    println!("cargo:rustc-env=DELEGATE_UPGRADER_TARGET={target}");
    println!("cargo:rerun-if-changed=build.rs");
}
