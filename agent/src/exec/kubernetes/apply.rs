//! The `apply` action: server-side apply with field manager `delegate`, every kind
//! resolved through API discovery of its group/version (so custom resources work, and no
//! list of kinds goes stale); CRDs of the same manifest go first and are waited for until
//! Established. The cluster's policy ([`super::policy`]) is checked for every object before
//! anything changes. Reading a manifest and resolving its kinds live here too: `delete`
//! and the `job` action's full Job use them.

use std::collections::{HashMap, HashSet};
use std::time::Duration;

use kube::Client;
use kube::api::{Api, DynamicObject, Patch, PatchParams};
use kube::core::GroupVersionKind;
use kube::discovery::{ApiCapabilities, ApiResource, Scope};
use tokio_util::sync::CancellationToken;

use super::client::{Failure, api_message, is_status};
use super::policy;
use crate::config::KubeCluster;
use crate::exec::ExecContext;

/// The field manager of every server-side apply by the agent.
pub const FIELD_MANAGER: &str = "delegate";
/// How long a CRD of a manifest may take to become Established.
const ESTABLISHED_LIMIT: Duration = Duration::from_secs(60);

/// One document of a manifest, parsed and placed.
struct Doc {
    /// 1-based position in the manifest, for messages.
    index: usize,
    obj: DynamicObject,
    gvk: GroupVersionKind,
}

impl Doc {
    fn is_crd(&self) -> bool {
        self.gvk.group == "apiextensions.k8s.io" && self.gvk.kind == "CustomResourceDefinition"
    }

    /// `deployment.apps/web` as kubectl names it.
    fn label(&self) -> String {
        let kind = self.gvk.kind.to_lowercase();
        let name = self.obj.metadata.name.as_deref().unwrap_or("");
        if self.gvk.group.is_empty() {
            format!("{kind}/{name}")
        } else {
            format!("{kind}.{}/{name}", self.gvk.group)
        }
    }
}

/// The documents of a multi-document YAML text, split as kubectl splits them: at lines
/// starting with the `---` marker (which YAML allows nowhere else at column 0). A first
/// document before the first marker that holds nothing is not counted, so indexes are what
/// a person counts.
fn documents(text: &str) -> Vec<&str> {
    let mut starts = vec![0];
    let mut at = 0;
    for line in text.split_inclusive('\n') {
        let marker = line
            .strip_prefix("---")
            .is_some_and(|rest| rest.is_empty() || rest.starts_with(char::is_whitespace));
        if marker && at > 0 {
            starts.push(at);
        }
        at += line.len();
    }
    starts.push(text.len());
    let mut docs: Vec<&str> = starts.windows(2).map(|w| &text[w[0]..w[1]]).collect();
    if docs.len() > 1 && is_blank(docs[0]) && !docs[0].starts_with("---") {
        docs.remove(0);
    }
    docs
}

/// Errors on one line (the task's message), without the source snippet.
pub(super) fn yaml_options() -> serde_saphyr::Options {
    let mut o = serde_saphyr::Options::default();
    o.with_snippet = false;
    o
}

/// A document of only markers, comments and white space.
fn is_blank(doc: &str) -> bool {
    doc.lines()
        .map(str::trim)
        .all(|l| l.is_empty() || l.starts_with('#') || l == "---")
}

/// Split a multi-document YAML manifest into objects; a document that does not parse or
/// lacks apiVersion, kind or metadata.name fails the whole manifest naming its index.
pub(super) fn parse_manifest(text: &str) -> Result<Vec<(usize, DynamicObject)>, String> {
    let mut out = Vec::new();
    for (i, doc) in documents(text).into_iter().enumerate() {
        let index = i + 1;
        if is_blank(doc) {
            continue; // an empty document (`---` at the start or end)
        }
        let value: serde_json::Value = serde_saphyr::from_str_with_options(doc, yaml_options())
            .map_err(|e| {
                let first = text[..doc.as_ptr() as usize - text.as_ptr() as usize]
                    .matches('\n')
                    .count()
                    + 1;
                format!(
                    "manifest document {index} is not valid YAML: {e} (counted from the document's first line, line {first} of the manifest)"
                )
            })?;
        if value.is_null() {
            continue; // `~` or `null`: nothing to apply
        }
        let obj: DynamicObject = serde_json::from_value(value)
            .map_err(|e| format!("manifest document {index} is not a Kubernetes object: {e}"))?;
        let Some(types) = &obj.types else {
            return Err(format!(
                "manifest document {index} has no apiVersion and kind"
            ));
        };
        if types.api_version.is_empty() || types.kind.is_empty() {
            return Err(format!(
                "manifest document {index} has no apiVersion and kind"
            ));
        }
        if obj.metadata.name.as_deref().is_none_or(str::is_empty) {
            return Err(format!(
                "manifest document {index} ({}) has no metadata.name",
                types.kind
            ));
        }
        out.push((index, obj));
    }
    if out.is_empty() {
        return Err("the manifest holds no objects".into());
    }
    Ok(out)
}

/// API resources resolved so far in one task, by group/version/kind.
#[derive(Default)]
pub(super) struct Resolver {
    known: HashMap<(String, String, String), (ApiResource, ApiCapabilities)>,
}

impl Resolver {
    pub(super) async fn resolve(
        &mut self,
        client: &Client,
        gvk: &GroupVersionKind,
    ) -> Result<(ApiResource, ApiCapabilities), kube::Error> {
        let key = (gvk.group.clone(), gvk.version.clone(), gvk.kind.clone());
        if let Some(r) = self.known.get(&key) {
            return Ok(r.clone());
        }
        // Discovery of this one group/version: no aggregated discovery (which 1.20
        // servers answer with zero groups) and no listing of every group.
        let r = kube::discovery::pinned_kind(client, gvk).await?;
        self.known.insert(key, r.clone());
        Ok(r)
    }
}

pub(super) async fn apply(
    client: &Client,
    cluster: &KubeCluster,
    ctx: &mut ExecContext,
    manifest: &str,
    default_ns: &str,
    force: bool,
    stop: &CancellationToken,
) -> Result<String, Failure> {
    let mut docs = Vec::new();
    for (index, obj) in parse_manifest(manifest)? {
        let types = obj.types.clone().unwrap_or_default();
        let gvk = GroupVersionKind::try_from(&types)
            .map_err(|e| format!("manifest document {index}: {e}"))?;
        docs.push(Doc { index, obj, gvk });
    }
    // CRDs first, then namespaces, then the rest in manifest order.
    docs.sort_by_key(|d| match () {
        _ if d.is_crd() => 0,
        _ if d.gvk.group.is_empty() && d.gvk.kind == "Namespace" => 1,
        _ => 2,
    });
    let mut params = PatchParams::apply(FIELD_MANAGER);
    if force {
        params = params.force();
    }
    let mut resolver = Resolver::default();
    check_manifest(client, cluster, &mut resolver, &docs, default_ns).await?;
    let (mut created, mut changed, mut unchanged) = (0, 0, 0);
    let mut crds_pending: Vec<String> = Vec::new();
    // (group, kind) of the custom resources whose CRDs this manifest applies.
    let mut defined_here: HashSet<(String, String)> = HashSet::new();
    for doc in &docs {
        if !doc.is_crd() && !crds_pending.is_empty() {
            for name in std::mem::take(&mut crds_pending) {
                wait_established(client, ctx, &name, stop).await?;
            }
        }
        let fresh = defined_here.contains(&(doc.gvk.group.clone(), doc.gvk.kind.clone()));
        let found = if fresh {
            resolve_fresh_kind(&mut resolver, client, ctx, &doc.gvk, stop).await
        } else {
            resolver.resolve(client, &doc.gvk).await
        };
        let (ar, caps) = found.map_err(|e| {
            if is_not_served(&e) {
                format!(
                    "manifest document {} ({}): the cluster has no kind {} in {}; is its CRD installed?",
                    doc.index,
                    doc.label(),
                    doc.gvk.kind,
                    types_of(&doc.gvk)
                )
            } else {
                format!(
                    "manifest document {} ({}): API discovery failed: {}",
                    doc.index,
                    doc.label(),
                    api_message(&e)
                )
            }
        })?;
        let name = doc.obj.metadata.name.clone().unwrap_or_default();
        // Checked before anything was applied; again here for a kind whose discovery
        // failed then.
        if let Some(why) = refused(cluster, doc, caps.scope.clone(), default_ns) {
            return Err(Failure(format!(
                "manifest document {} ({}): refused by the delegate's policy: {why}",
                doc.index,
                doc.label()
            )));
        }
        let (api, where_): (Api<DynamicObject>, String) = match caps.scope {
            Scope::Namespaced => {
                let ns = doc
                    .obj
                    .metadata
                    .namespace
                    .clone()
                    .unwrap_or_else(|| default_ns.to_string());
                let w = format!(" in namespace {ns}");
                (Api::namespaced_with(client.clone(), &ns, &ar), w)
            }
            Scope::Cluster => (Api::all_with(client.clone(), &ar), String::new()),
        };
        let mut obj = doc.obj.clone();
        if caps.scope == Scope::Namespaced && obj.metadata.namespace.is_none() {
            obj.metadata.namespace = Some(default_ns.to_string());
        }
        let fail = |what: &str, e: &kube::Error| {
            let hint = if is_status(e, 409) && !force {
                "; another field manager owns these fields: change them there, or set force = true to take them over"
            } else {
                ""
            };
            Failure(format!(
                "manifest document {} ({}{where_}): {what}: {}{hint}",
                doc.index,
                doc.label(),
                api_message(e)
            ))
        };
        let before = match api.get_opt(&name).await {
            Ok(b) => b,
            Err(e) => return Err(fail("cannot read it", &e)),
        };
        let after = api
            .patch(&name, &params, &Patch::Apply(&obj))
            .await
            .map_err(|e| fail("server-side apply failed", &e))?;
        let verdict = match verdict(&obj, before.as_ref(), &after) {
            Verdict::Created => {
                created += 1;
                "created"
            }
            Verdict::Unchanged => {
                unchanged += 1;
                "unchanged"
            }
            Verdict::Changed => {
                changed += 1;
                "changed"
            }
        };
        ctx.note(&format!("{}{where_} {verdict}", doc.label()));
        if doc.is_crd() {
            crds_pending.push(name);
            let spec = &doc.obj.data["spec"];
            if let (Some(group), Some(kind)) =
                (spec["group"].as_str(), spec["names"]["kind"].as_str())
            {
                defined_here.insert((group.to_string(), kind.to_string()));
            }
        }
    }
    for name in crds_pending {
        wait_established(client, ctx, &name, stop).await?;
    }
    Ok(format!(
        "applied {} objects: {created} created, {changed} changed, {unchanged} unchanged",
        docs.len()
    ))
}

/// Refuse the whole manifest, before anything is applied, when the cluster's policy
/// refuses one of its objects. Kinds whose CRD is in the manifest take the CRD's scope; a
/// kind discovery does not know is left to the apply, which fails on it (and checks it
/// again should it be known by then).
async fn check_manifest(
    client: &Client,
    cluster: &KubeCluster,
    resolver: &mut Resolver,
    docs: &[Doc],
    default_ns: &str,
) -> Result<(), Failure> {
    if !cluster.policy.is_set() {
        return Ok(());
    }
    let mut here: HashMap<(String, String), Scope> = HashMap::new();
    for d in docs.iter().filter(|d| d.is_crd()) {
        let spec = &d.obj.data["spec"];
        if let (Some(group), Some(kind)) = (spec["group"].as_str(), spec["names"]["kind"].as_str())
        {
            let scope = if spec["scope"].as_str() == Some("Cluster") {
                Scope::Cluster
            } else {
                Scope::Namespaced
            };
            here.insert((group.to_string(), kind.to_string()), scope);
        }
    }
    for doc in docs {
        let key = (doc.gvk.group.clone(), doc.gvk.kind.clone());
        let scope = match here.get(&key) {
            Some(s) => s.clone(),
            None => match resolver.resolve(client, &doc.gvk).await {
                Ok((_, caps)) => caps.scope,
                Err(_) => continue,
            },
        };
        if let Some(why) = refused(cluster, doc, scope, default_ns) {
            return Err(Failure(format!(
                "manifest document {} ({}): refused by the delegate's policy, nothing was applied: {why}",
                doc.index,
                doc.label()
            )));
        }
    }
    Ok(())
}

/// Why the cluster's policy refuses one document of a manifest, if it does.
fn refused(cluster: &KubeCluster, doc: &Doc, scope: Scope, default_ns: &str) -> Option<String> {
    let namespace = doc.obj.metadata.namespace.as_deref().unwrap_or(default_ns);
    let target = policy::Target {
        group: &doc.gvk.group,
        kind: &doc.gvk.kind,
        scope,
        namespace,
        name: doc.obj.metadata.name.as_deref().unwrap_or(""),
    };
    policy::refusal(&cluster.policy, &cluster.name, &target)
}

fn types_of(gvk: &GroupVersionKind) -> String {
    if gvk.group.is_empty() {
        gvk.version.clone()
    } else {
        format!("{}/{}", gvk.group, gvk.version)
    }
}

/// The server does not (yet) serve this group/version, or serves it without this kind.
fn is_not_served(e: &kube::Error) -> bool {
    is_status(e, 404)
        || matches!(
            e,
            kube::Error::Discovery(kube::error::DiscoveryError::MissingKind(_))
        )
}

/// Discovery of a kind whose CRD this manifest has just applied. The API server adds a
/// CRD to discovery a moment after it reports the CRD Established (seen on a loaded 1.20
/// server, about one run in six), so "not served" is retried, bounded by
/// [`ESTABLISHED_LIMIT`] and the task's stop, before it is reported as a missing CRD.
async fn resolve_fresh_kind(
    resolver: &mut Resolver,
    client: &Client,
    ctx: &mut ExecContext,
    gvk: &GroupVersionKind,
    stop: &CancellationToken,
) -> Result<(ApiResource, ApiCapabilities), kube::Error> {
    let deadline = tokio::time::Instant::now() + ESTABLISHED_LIMIT;
    let mut delay = Duration::from_millis(50);
    let mut said = false;
    loop {
        match resolver.resolve(client, gvk).await {
            Err(e) if is_not_served(&e) && tokio::time::Instant::now() < deadline => {
                if !said {
                    ctx.note(&format!(
                        "waiting for the API server to serve {} in {}",
                        gvk.kind,
                        types_of(gvk)
                    ));
                    said = true;
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => return Err(e),
                }
                delay = (delay * 2).min(Duration::from_secs(1));
            }
            found => return found,
        }
    }
}

/// Wait until the CRD `name` is Established, so its custom resources can be applied.
async fn wait_established(
    client: &Client,
    ctx: &mut ExecContext,
    name: &str,
    stop: &CancellationToken,
) -> Result<(), Failure> {
    use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
    let api: Api<CustomResourceDefinition> = Api::all(client.clone());
    let deadline = tokio::time::Instant::now() + ESTABLISHED_LIMIT;
    let mut delay = Duration::from_millis(50);
    loop {
        let crd = api
            .get(name)
            .await
            .map_err(|e| format!("CRD {name}: cannot read it back: {}", api_message(&e)))?;
        let established = crd
            .status
            .and_then(|s| s.conditions)
            .unwrap_or_default()
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        if established {
            ctx.note(&format!(
                "customresourcedefinition.apiextensions.k8s.io/{name} established"
            ));
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Failure(format!(
                "CRD {name} was not Established within {}s; see `kubectl describe crd {name}`",
                ESTABLISHED_LIMIT.as_secs()
            )));
        }
        tokio::select! {
            _ = tokio::time::sleep(delay) => {}
            _ = stop.cancelled() => return Err(Failure("stopped while waiting for CRDs".into())),
        }
        delay = (delay * 2).min(Duration::from_secs(1));
    }
}

/// What applying one document did to its object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Created,
    Changed,
    Unchanged,
}

/// Did the apply of `applied` change the object? The resource version alone cannot tell:
/// a controller may write the object between our read and our apply (the deployment
/// controller sets its revision annotation and status moments after a create), and an
/// apply that changed nothing then answers with that newer version. So it changed the
/// object only if the version moved *and* a value this manifest sets, or the set of fields
/// the delegate manages (a field dropped from the manifest), differs from before.
fn verdict(
    applied: &DynamicObject,
    before: Option<&DynamicObject>,
    after: &DynamicObject,
) -> Verdict {
    let Some(before) = before else {
        return Verdict::Created;
    };
    if before.metadata.resource_version == after.metadata.resource_version {
        return Verdict::Unchanged;
    }
    let as_json = |o: &DynamicObject| serde_json::to_value(o).unwrap_or_default();
    let (applied, before, after) = (as_json(applied), as_json(before), as_json(after));
    let ours = |o: &serde_json::Value| {
        o["metadata"]["managedFields"]
            .as_array()
            .and_then(|fields| {
                fields
                    .iter()
                    .find(|f| f["manager"] == FIELD_MANAGER && f["operation"] == "Apply")
            })
            .map(|f| f["fieldsV1"].clone())
    };
    if differs_where_set(&applied, &before, &after) || ours(&before) != ours(&after) {
        Verdict::Changed
    } else {
        Verdict::Unchanged
    }
}

/// Does `before` differ from `after` at any value `applied` sets (maps followed key by
/// key, anything else compared whole)?
fn differs_where_set(
    applied: &serde_json::Value,
    before: &serde_json::Value,
    after: &serde_json::Value,
) -> bool {
    match applied {
        serde_json::Value::Object(keys) => keys
            .iter()
            .any(|(k, v)| differs_where_set(v, &before[k.as_str()], &after[k.as_str()])),
        _ => before != after,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn object(v: serde_json::Value) -> DynamicObject {
        serde_json::from_value(v).expect("a test object")
    }

    fn deployment(rv: &str, image: &str, revision: Option<&str>, fields: &str) -> DynamicObject {
        let mut annotations = serde_json::Map::new();
        if let Some(r) = revision {
            annotations.insert("deployment.kubernetes.io/revision".into(), r.into());
        }
        object(serde_json::json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {
                "name": "web", "namespace": "ns", "resourceVersion": rv,
                "annotations": annotations,
                "managedFields": [
                    {"manager": FIELD_MANAGER, "operation": "Apply", "fieldsV1": {"f:spec": {fields: {}}}},
                    {"manager": "kube-controller-manager", "operation": "Update", "fieldsV1": {"f:status": {}}}
                ]
            },
            "spec": {"replicas": 0, "template": {"spec": {"containers": [{"name": "web", "image": image, "imagePullPolicy": "IfNotPresent"}]}}},
            "status": {"observedGeneration": rv.len()}
        }))
    }

    fn manifest(image: &str) -> DynamicObject {
        object(serde_json::json!({
            "apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "web", "namespace": "ns"},
            "spec": {"replicas": 0, "template": {"spec": {"containers": [{"name": "web", "image": image}]}}}
        }))
    }

    /// A controller's write between our read and our apply moves the resource version
    /// (here: the revision annotation and the status), but the apply changed nothing of
    /// what the manifest sets: unchanged, as a second apply of the same manifest must say.
    #[test]
    fn a_controllers_write_between_read_and_apply_is_not_our_change() {
        let before = deployment("10", "web:1", None, "f:replicas");
        let after = deployment("11", "web:1", Some("1"), "f:replicas");
        assert_eq!(
            verdict(&manifest("web:1"), Some(&before), &after),
            Verdict::Unchanged
        );
        assert_eq!(
            verdict(&manifest("web:1"), Some(&before), &before),
            Verdict::Unchanged
        );
        assert_eq!(verdict(&manifest("web:1"), None, &after), Verdict::Created);
    }

    #[test]
    fn a_value_the_manifest_sets_or_a_field_it_dropped_is_a_change() {
        let before = deployment("10", "web:1", None, "f:replicas");
        let after = deployment("11", "web:2", Some("1"), "f:replicas");
        assert_eq!(
            verdict(&manifest("web:2"), Some(&before), &after),
            Verdict::Changed
        );
        // Same values, but the delegate now manages fewer fields: a field left the manifest.
        let after = deployment("11", "web:1", None, "f:paused");
        assert_eq!(
            verdict(&manifest("web:1"), Some(&before), &after),
            Verdict::Changed
        );
    }

    #[test]
    fn a_malformed_document_is_named_by_its_index_and_parse_error() {
        let text = "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n---\napiVersion: v1\nkind: ConfigMap\nmetadata: [\n";
        let e = parse_manifest(text).expect_err("broken");
        assert_eq!(
            e,
            "manifest document 2 is not valid YAML: unclosed bracket '[' at line 4, column 11 (counted from the document's first line, line 5 of the manifest)"
        );
        let e =
            parse_manifest("kind: ConfigMap\nmetadata:\n  name: a\n").expect_err("no apiVersion");
        assert!(e.starts_with("manifest document 1 "), "{e}");
        let e = parse_manifest("apiVersion: v1\nkind: ConfigMap\n").expect_err("no name");
        assert_eq!(e, "manifest document 1 (ConfigMap) has no metadata.name");
    }

    #[test]
    fn documents_split_at_markers_as_kubectl_does() {
        let text = "# leading comment\n---\na: 1\n--- # marker with a comment\nb: |\n  ---not a marker (indented)\n---\n";
        let docs = documents(text);
        assert_eq!(docs.len(), 3, "{docs:?}");
        assert!(docs[0].contains("a: 1"));
        assert!(docs[1].contains("not a marker"));
        assert!(is_blank(docs[2]));
        let e = parse_manifest(
            "---\napiVersion: v1\nkind: ConfigMap\nmetadata: {name: a}\n---\nkind: [\n",
        )
        .expect_err("second is broken");
        assert!(
            e.starts_with("manifest document 2 is not valid YAML: "),
            "{e}"
        );
        let docs = parse_manifest(
            "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\ndata:\n  n: \"1\"\n  text: |\n    x\n    y\n",
        )
        .expect("parses");
        assert_eq!(docs[0].1.data["data"]["text"], "x\ny\n");
    }

    #[test]
    fn empty_documents_are_skipped_and_indexes_kept() {
        let text = "---\napiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: a\n---\n---\napiVersion: v1\nkind: Secret\nmetadata:\n  name: b\n";
        let docs = parse_manifest(text).expect("parses");
        let idx: Vec<usize> = docs.iter().map(|(i, _)| *i).collect();
        assert_eq!(idx.len(), 2);
        assert!(idx[1] > idx[0]);
    }
}
