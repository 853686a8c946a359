//! Every manifest and artifact check, each refused with its exact error variant (the
//! upgrader prints `error[<code>]`, one code per `UpgradeError` variant) and exit code 2
//! (refused) or 75 (retry later). None of these reach the drain, so no bus is needed.

use std::fs;
use std::time::Duration;

use delegate_tests::upgrade::{Run, World, fake_binary};

const NO_BUS: &str = "unix:path=/nonexistent/bus.sock";
const LIMIT: Duration = Duration::from_secs(60);

/// A host at 0.1.0 (a fake binary) and a channel offering 0.2.0.
fn world() -> World {
    let w = World::new(NO_BUS).expect("world");
    let v1 = fake_binary(&w.dir.join("bin"), "0.1.0").expect("fake 0.1.0");
    w.install_initial(&v1, "0.1.0").expect("install 0.1.0");
    w
}

fn publish(w: &World, v: &str) {
    let b = fake_binary(&w.dir.join("bin"), v).expect("fake");
    w.publish(&b, None, "1h").expect("publish");
}

fn refused(r: &Run, code: &str, exit: i32) {
    assert_eq!(r.error_code().as_deref(), Some(code), "{r:#?}");
    assert_eq!(r.code, Some(exit), "{r:#?}");
}

fn run(w: &World) -> Run {
    w.upgrader(&["run"], None, LIMIT).expect("run")
}

fn check(w: &World) -> Run {
    w.upgrader(&["check"], None, LIMIT).expect("check")
}

#[test]
fn check_reports_what_run_would_do() {
    let w = world();
    publish(&w, "0.2.0");
    let r = check(&w);
    assert_eq!(r.code, Some(0), "{r:#?}");
    assert!(r.stdout.contains("would upgrade 0.1.0 → 0.2.0"), "{r:#?}");
    assert_eq!(w.current().as_deref(), Some("0.1.0"));
    assert!(!w.root.join("state.json").exists(), "check wrote state");
}

#[test]
fn bad_signature_is_refused() {
    let w = world();
    publish(&w, "0.2.0");
    let text = fs::read_to_string(w.manifest_path()).expect("manifest");
    fs::write(w.manifest_path(), text.replace("\"stable\"", "\"stable\" ")).expect("tamper");
    refused(&check(&w), "bad-signature", 2);
    refused(&run(&w), "bad-signature", 2);
    assert_eq!(w.current().as_deref(), Some("0.1.0"));
}

#[test]
fn unknown_key_is_refused() {
    let w = world();
    let other = w.keygen("other-key").expect("keygen");
    let b = fake_binary(&w.dir.join("bin"), "0.2.0").expect("fake");
    w.publish(&b, Some(&other.join("delegate-release.key")), "1h")
        .expect("publish");
    refused(&run(&w), "untrusted-key", 2);
}

#[test]
fn no_trusted_key_fails_closed() {
    let w = world();
    publish(&w, "0.2.0");
    fs::remove_file(w.keys.join("delegate-release.pub")).expect("rm key");
    let r = run(&w);
    refused(&r, "no-trusted-keys", 2);
    assert!(r.stderr.contains("fail closed"), "{r:#?}");
}

#[test]
fn a_second_trusted_key_is_accepted_for_rotation() {
    let w = world();
    let next = w.keygen("next-key").expect("keygen");
    fs::copy(next.join("delegate-release.pub"), w.keys.join("next.pub")).expect("trust");
    let b = fake_binary(&w.dir.join("bin"), "0.2.0").expect("fake");
    w.publish(&b, Some(&next.join("delegate-release.key")), "1h")
        .expect("publish");
    let r = check(&w);
    assert_eq!(r.code, Some(0), "{r:#?}");
}

#[test]
fn expired_manifest_is_refused() {
    let w = world();
    let b = fake_binary(&w.dir.join("bin"), "0.2.0").expect("fake");
    w.publish(&b, None, "0s").expect("publish");
    refused(&run(&w), "expired", 2);
}

#[test]
fn replayed_older_manifest_is_refused() {
    let w = world();
    publish(&w, "0.2.0");
    let old_json = fs::read(w.manifest_path()).expect("old");
    let sig_path = w.releases.join("channels/stable.json.minisig");
    let old_sig = fs::read(&sig_path).expect("old sig");
    publish(&w, "0.3.0");
    assert!(run_seen(&w), "the newer manifest was not recorded");
    fs::write(w.manifest_path(), old_json).expect("replay");
    fs::write(&sig_path, old_sig).expect("replay sig");
    refused(&run(&w), "replayed", 2);
}

/// Let a run accept the current manifest but fail before installing (not enough disk),
/// then report whether its `published_at` was recorded.
fn run_seen(w: &World) -> bool {
    let cfg = fs::read_to_string(&w.config).expect("cfg");
    fs::write(
        &w.config,
        cfg.replace("min_free_mb = 1\n", "min_free_mb = 1000000000000\n"),
    )
    .expect("cfg");
    let r = run(w);
    fs::write(&w.config, cfg).expect("cfg");
    assert_eq!(r.error_code().as_deref(), Some("not-enough-disk"), "{r:#?}");
    w.state()
        .map(|s| s["last_seen"]["stable"]["published_at"].is_u64())
        .unwrap_or(false)
}

#[test]
fn downgrade_without_pin_is_refused_and_allowed_with_pin() {
    let w = world();
    publish(&w, "0.0.9");
    refused(&run(&w), "downgrade", 2);
    let mut w = w;
    w.extra = "pinned_version = \"0.0.9\"\n".into();
    w.write_config().expect("config");
    let r = check(&w);
    assert!(r.stdout.contains("would upgrade 0.1.0 → 0.0.9"), "{r:#?}");
}

#[test]
fn skipped_version_is_refused() {
    let w = world();
    publish(&w, "0.2.0");
    let r = w.upgrader(&["skip", "0.2.0"], None, LIMIT).expect("skip");
    assert_eq!(r.code, Some(0), "{r:#?}");
    refused(&run(&w), "skipped", 2);
    let r = w.upgrader(&["status"], None, LIMIT).expect("status");
    assert!(r.stdout.contains("skip list:   0.2.0"), "{r:#?}");
}

#[test]
fn sha256_mismatch_is_refused() {
    let w = world();
    publish(&w, "0.2.0");
    let a = w.releases.join(w.artifact_rel().expect("rel"));
    let mut bytes = fs::read(&a).expect("artifact");
    let last = bytes.len() - 1;
    bytes[last] ^= 0xff;
    fs::write(&a, bytes).expect("tamper");
    refused(&run(&w), "sha256-mismatch", 2);
    assert!(!w.root.join("versions/0.2.0").exists());
}

#[test]
fn wrong_size_is_refused() {
    let w = world();
    publish(&w, "0.2.0");
    let a = w.releases.join(w.artifact_rel().expect("rel"));
    let mut bytes = fs::read(&a).expect("artifact");
    bytes.extend_from_slice(b"trailing");
    fs::write(&a, bytes).expect("grow");
    refused(&run(&w), "size-mismatch", 2);
}

#[test]
fn truncated_download_is_retried_later() {
    let w = world();
    publish(&w, "0.2.0");
    let rel = w.artifact_rel().expect("rel");
    w.server
        .truncate
        .lock()
        .expect("lock")
        .insert(format!("/{rel}"));
    refused(&run(&w), "truncated", 75);
    assert!(!w.root.join("versions/0.2.0").exists());
    let leftovers: Vec<_> = fs::read_dir(w.root.join("versions"))
        .expect("ls")
        .flatten()
        .map(|e| e.file_name())
        .collect();
    assert_eq!(leftovers.len(), 1, "{leftovers:?}");
}

#[test]
fn archive_without_binary_is_refused() {
    let w = world();
    publish(&w, "0.2.0");
    let rel = w.artifact_rel().expect("rel");
    let a = w.releases.join(&rel);
    // A correctly signed manifest pointing at an archive that holds no `delegate`.
    let src = w.dir.join("empty-release");
    fs::create_dir_all(&src).expect("dir");
    fs::write(src.join("README"), "no binary here\n").expect("readme");
    let st = std::process::Command::new("tar")
        .arg("-czf")
        .arg(&a)
        .arg("-C")
        .arg(&src)
        .arg("README")
        .status()
        .expect("tar");
    assert!(st.success());
    let bytes = fs::read(&a).expect("archive");
    let out = std::process::Command::new("sha256sum")
        .arg(&a)
        .output()
        .expect("sha256sum");
    let digest = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .expect("digest")
        .to_string();
    let mut m = w.manifest().expect("manifest");
    for art in m["artifacts"].as_object_mut().expect("arts").values_mut() {
        art["sha256"] = digest.clone().into();
        art["size"] = (bytes.len() as u64).into();
    }
    fs::write(
        w.manifest_path(),
        serde_json::to_vec_pretty(&m).expect("json"),
    )
    .expect("write");
    w.resign("channels/stable.json").expect("resign");
    refused(&run(&w), "missing-binary", 2);
}

#[test]
fn not_enough_disk_is_refused() {
    let w = world();
    publish(&w, "0.2.0");
    let cfg = fs::read_to_string(&w.config).expect("cfg");
    fs::write(
        &w.config,
        cfg.replace("min_free_mb = 1\n", "min_free_mb = 1000000000000\n"),
    )
    .expect("cfg");
    let r = run(&w);
    refused(&r, "not-enough-disk", 2);
    assert!(r.stderr.contains("free some disk space"), "{r:#?}");
}

#[test]
fn config_errors_name_the_line() {
    let w = world();
    fs::write(
        &w.config,
        "channel_url = \"http://x\"\nhealth_timeout = \"later\"\n",
    )
    .expect("cfg");
    let r = run(&w);
    assert!(
        r.stderr.contains("upgrader.toml:2: health_timeout"),
        "{r:#?}"
    );
}

#[test]
fn signatures_verify_with_the_minisign_tool() {
    let ok = std::process::Command::new("minisign")
        .arg("-v")
        .output()
        .is_ok_and(|o| o.status.success());
    if !ok {
        eprintln!(
            "\n!!!!! SKIPPED: `minisign` is not installed; interoperability not checked !!!!!\n"
        );
        return;
    }
    let w = world();
    publish(&w, "0.2.0");
    let key = w.dir.join("signing").join("delegate-release.pub");
    let artifact = w.releases.join(w.artifact_rel().expect("rel"));
    for file in [w.manifest_path(), artifact] {
        let out = std::process::Command::new("minisign")
            .arg("-Vm")
            .arg(&file)
            .arg("-p")
            .arg(&key)
            .output()
            .expect("minisign");
        assert!(out.status.success(), "{file:?}: {out:?}");
    }
}
