//! Every manifest and artifact check, each refused with its exact error variant (the
//! upgrader prints `error[<code>]`, one code per `UpgradeError` variant) and exit code 2
//! (refused) or 75 (retry later). None of these reach the drain, so no bus is needed.

use std::fs;
use std::time::Duration;

use delegate_tests::require;
use delegate_tests::upgrade::{Run, World, fake_binary, require_tool, write_executable};

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
    let cfg = w
        .edit_config("min_free_mb = 1\n", "min_free_mb = 1000000000000\n")
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

/// A skipped version is never installed, but a timer run that finds only it succeeds with
/// a notice: the rollback that put it there already failed loudly (it exited 2 hourly before).
#[test]
fn a_skipped_version_is_not_installed_and_the_run_ends_with_a_notice_not_a_failure() {
    let w = world();
    publish(&w, "0.2.0");
    let before = w.current();
    let r = w.upgrader(&["skip", "0.2.0"], None, LIMIT).expect("skip");
    assert_eq!(r.code, Some(0), "{r:#?}");
    for r in [run(&w), check(&w)] {
        assert_eq!(r.code, Some(0), "{r:#?}");
        assert!(
            r.stdout.contains("skipped: the channel offers 0.2.0")
                && r.stdout.contains("`delegate-upgrader unskip 0.2.0`"),
            "{r:#?}"
        );
    }
    assert_eq!(w.current(), before, "a skipped version is not installed");
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
    w.edit_config("min_free_mb = 1\n", "min_free_mb = 1000000000000\n")
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
    require!(require_tool("minisign", "-v", "minisign"));
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

/// A tar.gz holding `binary` as `delegate`, made with the system `tar`.
fn pack(w: &World, binary: &std::path::Path, out: &std::path::Path) {
    let src = w.dir.join(format!(
        "pack-{}",
        out.file_name().and_then(|n| n.to_str()).unwrap_or("x")
    ));
    fs::create_dir_all(&src).expect("dir");
    fs::copy(binary, src.join("delegate")).expect("copy");
    let st = std::process::Command::new("tar")
        .arg("-czf")
        .arg(out)
        .arg("-C")
        .arg(&src)
        .arg("delegate")
        .status()
        .expect("tar");
    assert!(st.success());
}

/// A binary that passes the `version` check for 0.2.0 but is not the published one.
fn evil_binary(w: &World) -> std::path::PathBuf {
    let p = w.dir.join("evil").join("delegate");
    fs::create_dir_all(p.parent().expect("parent")).expect("dir");
    write_executable(
        &p,
        b"#!/bin/sh\n# EVIL: not the signed release\necho 0.2.0\n",
    )
    .expect("evil");
    p
}

/// The bytes verified are the bytes unpacked (reproduced): `install` read and verified the archive, then opened the
/// path again to unpack it. A FIFO serves the signed archive on the first open and another
/// archive on the second: only the verified bytes may end up in `versions/0.2.0`.
#[test]
fn offline_install_unpacks_the_bytes_it_verified_not_a_second_read_of_the_path() {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let w = world();
    publish(&w, "0.2.0");
    let signed = w.releases.join(w.artifact_rel().expect("rel"));
    let sig = format!("{}.minisig", signed.display());
    let good = fs::read(&signed).expect("archive");
    let evil_tgz = w.dir.join("evil.tar.gz");
    pack(&w, &evil_binary(&w), &evil_tgz);
    let evil = fs::read(&evil_tgz).expect("evil archive");

    let fifo = w.dir.join("release.tar.gz");
    nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).expect("mkfifo");
    let fifo2 = fifo.clone();
    let (tx, served) = std::sync::mpsc::channel();
    let server = std::thread::spawn(move || {
        for (i, payload) in [good, evil].into_iter().enumerate() {
            // Blocks until a reader opens the FIFO.
            let Ok(mut f) = fs::OpenOptions::new().write(true).open(&fifo2) else {
                return;
            };
            let _ = tx.send(i);
            let _ = f.write_all(&payload);
            drop(f);
            // Serve the next payload to the next open, not to this reader: wait until it
            // has closed (a non-blocking open for writing fails with ENXIO when no reader
            // holds the FIFO).
            let start = std::time::Instant::now();
            while fs::OpenOptions::new()
                .write(true)
                .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
                .open(&fifo2)
                .is_ok()
            {
                if start.elapsed() > LIMIT {
                    return;
                }
                std::thread::yield_now();
            }
        }
    });
    let r = w
        .upgrader(
            &["install", &fifo.display().to_string(), "--signature", &sig],
            None,
            LIMIT,
        )
        .expect("install");
    // Unblock the server if it still waits for a second reader, then stop it.
    drop(
        fs::OpenOptions::new()
            .read(true)
            .custom_flags(nix::fcntl::OFlag::O_NONBLOCK.bits())
            .open(&fifo),
    );
    server.join().expect("fifo server");
    let opens: Vec<usize> = served.try_iter().collect();

    // Verified, unpacked, checked; it then stops at the drain (no bus in this world).
    refused(&r, "bus", 75);
    let installed = fs::read(w.root.join("versions/0.2.0/delegate")).expect("unpacked binary");
    let published = fs::read(w.dir.join("bin").join("fake-0.2.0")).expect("published binary");
    assert!(
        installed == published,
        "versions/0.2.0/delegate is not the binary that was signed (FIFO opened {} time(s)):\n{}",
        opens.len(),
        String::from_utf8_lossy(&installed)
    );
}

/// A `versions/<v>` left with its `complete` marker is re-checked against
/// the signed SHA-256 before it is reused; a changed binary is unpacked again.
#[test]
fn a_tampered_complete_version_directory_is_not_reused() {
    let w = world();
    publish(&w, "0.2.0");
    // The first run unpacks 0.2.0 and stops at the drain (no bus in this world).
    refused(&run(&w), "bus", 75);
    let bin = w.root.join("versions/0.2.0/delegate");
    assert!(w.is_complete("0.2.0"));
    write_executable(&bin, &fs::read(evil_binary(&w)).expect("evil")).expect("tamper");

    let r = run(&w);
    refused(&r, "bus", 75);
    let published = fs::read(w.dir.join("bin").join("fake-0.2.0")).expect("published binary");
    assert!(
        fs::read(&bin).expect("binary") == published,
        "the tampered binary was reused: {r:#?}"
    );
    assert!(r.stderr.contains("is not reused"), "{r:#?}");
}

/// A host clock earlier than the newest `published_at` already accepted
/// means time went backwards (an expired manifest would look fresh): refused, and the
/// operator is told to fix the clock (exit 1: this host needs an operator).
#[test]
fn a_clock_behind_the_newest_manifest_seen_is_refused() {
    let w = world();
    publish(&w, "0.2.0");
    let future = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock")
        .as_secs()
        + 86_400;
    fs::create_dir_all(&w.root).expect("root");
    fs::write(
        w.root.join("state.json"),
        serde_json::to_vec(&serde_json::json!({
            "last_seen": {"stable": {"version": "0.1.5", "published_at": future}}
        }))
        .expect("json"),
    )
    .expect("state");
    let r = run(&w);
    refused(&r, "clock-behind", 1);
    assert!(r.stderr.contains("fix the clock"), "{r:#?}");
    assert_eq!(w.current().as_deref(), Some("0.1.0"));
}

/// A mistyped channel (the server answers 404) is a configuration error
/// with its own exit code (78, EX_CONFIG), not a network flake retried forever (75).
#[test]
fn a_channel_the_server_does_not_have_is_a_configuration_error() {
    let w = world();
    publish(&w, "0.2.0");
    w.edit_config("channel = \"stable\"", "channel = \"stabel\"")
        .expect("cfg");
    let r = run(&w);
    refused(&r, "channel-rejected", 78);
    assert!(r.stderr.contains("404"), "{r:#?}");
    assert!(r.stderr.contains("channels/stabel.json"), "{r:#?}");
}

/// Versions are strict semver wherever they enter; a version with a `/`
/// in a signed manifest is refused before it can name a directory.
#[test]
fn a_version_that_is_not_semver_is_refused_where_it_is_parsed() {
    let w = world();
    publish(&w, "0.2.0");
    let mut m = w.manifest().expect("manifest");
    // The old parser took anything after `-` as the pre-release: a path.
    m["version"] = "0.3.0-x/../../../evil".into();
    fs::write(
        w.manifest_path(),
        serde_json::to_vec_pretty(&m).expect("json"),
    )
    .expect("write");
    w.resign("channels/stable.json").expect("resign");
    let r = run(&w);
    refused(&r, "bad-manifest", 2);
    assert!(r.stderr.contains("not a semantic version"), "{r:#?}");
    let r = w
        .upgrader(&["skip", "1.0.0-a/b"], None, LIMIT)
        .expect("skip");
    assert_eq!(r.code, Some(2), "{r:#?}");
    assert!(r.stderr.contains("not a semantic version"), "{r:#?}");
}
