//! The kubernetes target against a real control plane (etcd, kube-apiserver,
//! kube-controller-manager, kube-scheduler from `scripts/kube-build`) on loopback: the
//! real manager and agent binaries, cross-checked with the real `kubectl`.
//!
//! One control plane serves the whole binary (it takes ~10 s to start); each test works in
//! its own namespace with its own manager and agent. `world` is the harness, `kubelet` the
//! stand-in node; the other modules hold the tests, by theme.

mod any_cluster;
mod apply;
mod cli;
mod delete;
mod incluster;
mod infra;
mod jobs;
mod kubelet;
mod late;
mod logs;
mod measure;
mod policy;
mod rbac;
mod rollout;
mod workloads;
mod world;
