"""Kubernetes manifests under k8s/: every YAML parses, every KubeRay resource (and every overlay,
rendered) validates against KubeRay's published CRD schema, and the rendered jobs have the worker
count, config, security settings and resources they claim.

The CRDs are reference data outside the repository, at ``../shared/schemas/kuberay/`` from the
repo root; the schema tests skip with a reason when that folder is absent. The overlays are
rendered by a tiny kustomize subset below (resources + JSON6902 ``patches`` + ``images``) that
raises on anything it does not implement, so an overlay using an unsupported feature fails here
instead of being checked as if it were not there.
"""
from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
from functools import lru_cache
from pathlib import Path

import pytest
import yaml

jsonschema = pytest.importorskip("jsonschema", reason="jsonschema is needed to validate k8s/ manifests against the KubeRay CRDs")

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
BASE = K8S / "base"
OVERLAYS = K8S / "overlays"
CRD_DIR = ROOT.parent / "shared" / "schemas" / "kuberay"
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}

# What each overlay must render to: (worker pods, GPUs per worker, config path in the entrypoint).
EXPECTED_OVERLAYS = {
    "single-node-128k": (1, 8, "/workspace/configs/gpu-1node-128k.yaml"),
    "multi-node-256k": (4, 8, "/workspace/configs/gpu-4node-256k.yaml"),
}

_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are MBs of YAML


def load_docs(path: Path) -> list[dict]:
    with open(path) as f:
        docs = [d for d in yaml.load_all(f, Loader=_Loader) if d is not None]
    for d in docs:
        assert isinstance(d, dict), f"{path}: a YAML document is not a mapping"
    return docs


def all_yaml_files() -> list[Path]:
    return sorted(p for p in K8S.rglob("*") if p.suffix in (".yaml", ".yml") and p.is_file())


def is_kustomization(path: Path) -> bool:
    return path.name in ("kustomization.yaml", "kustomization.yml", "Kustomization")


def overlay_dirs() -> list[Path]:
    return sorted(p.parent for p in OVERLAYS.glob("*/kustomization.yaml"))


# --------------------------------------------------------------------------------------------
# A tiny kustomize: resources, JSON6902 patches (add/replace/remove), images. Anything else raises.
# --------------------------------------------------------------------------------------------
class Unsupported(Exception):
    """The renderer met a kustomize feature or patch it does not implement."""


_KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "patches", "images"}
_PATCH_KEYS = {"target", "patch", "path"}
_TARGET_KEYS = {"group", "version", "kind", "name"}
_IMAGE_KEYS = {"name", "newName", "newTag", "digest"}


def _pointer(path: str) -> list[str]:
    if not isinstance(path, str) or not path.startswith("/"):
        raise Unsupported(f"JSON pointer must start with '/': {path!r}")
    return [t.replace("~1", "/").replace("~0", "~") for t in path[1:].split("/")]


def _child(node, token: str, path: str):
    if isinstance(node, dict):
        if token not in node:
            raise KeyError(f"{path}: no key {token!r}")
        return node[token]
    if isinstance(node, list):
        if not token.isdigit() or int(token) >= len(node):
            raise KeyError(f"{path}: bad list index {token!r} (length {len(node)})")
        return node[int(token)]
    raise KeyError(f"{path}: cannot descend into a {type(node).__name__} at {token!r}")


def apply_json6902(doc: dict, ops: list) -> dict:
    """RFC 6902 add/replace/remove on ``doc`` (a copy is returned); move/copy/test raise."""
    doc = copy.deepcopy(doc)
    if not isinstance(ops, list):
        raise Unsupported(f"a JSON6902 patch is a list of operations, got {type(ops).__name__}")
    for op in ops:
        if not isinstance(op, dict) or set(op) - {"op", "path", "value"}:
            raise Unsupported(f"unsupported patch operation {op!r}")
        kind, path = op.get("op"), op.get("path")
        if kind not in ("add", "replace", "remove"):
            raise Unsupported(f"JSON6902 op {kind!r} is not implemented (add, replace, remove are)")
        if kind != "remove" and "value" not in op:
            raise Unsupported(f"{kind} {path}: no value")
        tokens = _pointer(path)
        parent = doc
        for tok in tokens[:-1]:
            parent = _child(parent, tok, path)
        last = tokens[-1]
        value = copy.deepcopy(op.get("value"))
        if isinstance(parent, dict):
            if kind != "add" and last not in parent:
                raise KeyError(f"{kind} {path}: no key {last!r}")
            if kind == "remove":
                del parent[last]
            else:
                parent[last] = value
        elif isinstance(parent, list):
            if kind == "add" and last == "-":
                parent.append(value)
                continue
            if not last.isdigit():
                raise KeyError(f"{kind} {path}: bad list index {last!r}")
            i = int(last)
            if i > len(parent) or (kind != "add" and i == len(parent)):
                raise KeyError(f"{kind} {path}: index {i} out of range (length {len(parent)})")
            if kind == "add":
                parent.insert(i, value)
            elif kind == "replace":
                parent[i] = value
            else:
                del parent[i]
        else:
            raise KeyError(f"{kind} {path}: parent is a {type(parent).__name__}")
    return doc


def _matches(doc: dict, target: dict) -> bool:
    group, _, version = doc.get("apiVersion", "").rpartition("/")
    actual = {"group": group, "version": version, "kind": doc.get("kind"),
              "name": doc.get("metadata", {}).get("name")}
    return all(actual[k] == v for k, v in target.items())


def _containers(node):
    """Every container mapping in any containers/initContainers list, anywhere in ``node``."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k in ("containers", "initContainers") and isinstance(v, list):
                yield from (c for c in v if isinstance(c, dict))
            else:
                yield from _containers(v)
    elif isinstance(node, list):
        for v in node:
            yield from _containers(v)


def _set_images(docs: list[dict], images: list) -> None:
    for img in images:
        if not isinstance(img, dict) or set(img) - _IMAGE_KEYS or "name" not in img:
            raise Unsupported(f"unsupported images entry {img!r}")
        hits = 0
        for c in (c for d in docs for c in _containers(d)):
            ref = c.get("image", "")
            name = re.split(r"@|:(?=[^/]*$)", ref)[0]
            if name != img["name"]:
                continue
            hits += 1
            new = img.get("newName", name)
            if "digest" in img:
                new += "@" + img["digest"]
            elif "newTag" in img:
                new += ":" + str(img["newTag"])
            else:
                new += ref[len(name):]
            c["image"] = new
        if not hits:
            raise Unsupported(f"images entry {img['name']!r} matches no container")


def render(directory: Path) -> list[dict]:
    """``kustomize build directory`` for the subset above."""
    kfile = directory / "kustomization.yaml"
    if not kfile.is_file():
        raise Unsupported(f"{directory}: no kustomization.yaml")
    (k,) = load_docs(kfile)
    extra = set(k) - _KUSTOMIZATION_KEYS
    if extra:
        raise Unsupported(f"{kfile}: kustomization fields not implemented by the test renderer: {sorted(extra)}")
    docs: list[dict] = []
    for res in k.get("resources", []):
        p = (directory / res).resolve()
        if p.is_dir():
            docs += render(p)
        elif p.is_file():
            docs += load_docs(p)
        else:
            raise Unsupported(f"{kfile}: resource {res!r} is neither a file nor a directory (remote resources are not implemented)")
    ids = [(d.get("apiVersion"), d.get("kind"), d.get("metadata", {}).get("name")) for d in docs]
    if len(set(ids)) != len(ids):
        raise Unsupported(f"{kfile}: duplicate resources {ids}")
    for patch in k.get("patches", []):
        if not isinstance(patch, dict) or set(patch) - _PATCH_KEYS or ("patch" in patch) == ("path" in patch):
            raise Unsupported(f"{kfile}: a patch needs a target and exactly one of patch/path: {patch!r}")
        target = patch.get("target")
        if not isinstance(target, dict) or not target or set(target) - _TARGET_KEYS:
            raise Unsupported(f"{kfile}: patch target {target!r} (only group/version/kind/name are implemented)")
        text = patch["patch"] if "patch" in patch else (directory / patch["path"]).read_text()
        ops = yaml.safe_load(text)
        if not isinstance(ops, list):
            raise Unsupported(f"{kfile}: only JSON6902 patches (a list of ops) are implemented, not strategic merge")
        hits = [i for i, d in enumerate(docs) if _matches(d, target)]
        if not hits:
            raise Unsupported(f"{kfile}: patch target {target} matches no resource")
        for i in hits:
            docs[i] = apply_json6902(docs[i], ops)
    if "images" in k:
        _set_images(docs, k["images"])
    return docs


# --------------------------------------------------------------------------------------------
# CRD schema -> jsonschema
# --------------------------------------------------------------------------------------------
def _adapt(node):
    """OpenAPI v3 (Kubernetes structural schema) -> JSON Schema draft 4, kept small:

    * ``x-kubernetes-*`` keys are dropped: CEL rules (``x-kubernetes-validations``) are about
      updates or fields we do not set; list/map types are merge hints. Int-or-string fields already
      carry ``anyOf: [integer, string]``, which jsonschema checks as is.
    * ``format`` (int32/int64/date-time) stays and is not asserted (no format checker is passed).
    * ``nullable: true`` becomes ``type: [T, "null"]``.
    * An object schema with ``properties`` and no ``additionalProperties`` gets
      ``additionalProperties: false`` (unless it preserves unknown fields), as the API server
      rejects unknown fields under ``kubectl apply``'s default strict field validation; without it
      a misspelt field would pass here and be dropped silently by the cluster.
    """
    if isinstance(node, list):
        return [_adapt(v) for v in node]
    if not isinstance(node, dict):
        return node
    preserve = node.get("x-kubernetes-preserve-unknown-fields") is True
    out = {k: _adapt(v) for k, v in node.items() if not k.startswith("x-kubernetes-") and k != "nullable"}
    # "properties" maps field names to schemas: adapt the values, never treat the names as keywords.
    if isinstance(node.get("properties"), dict):
        out["properties"] = {name: _adapt(s) for name, s in node["properties"].items()}
    if node.get("nullable") is True and "type" in out:
        out["type"] = [out["type"], "null"]
    if "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


@lru_cache(maxsize=None)
def crd_validator(kind: str, version: str):
    (crd,) = load_docs(CRD_DIR / CRD_FILES[kind])
    assert crd["spec"]["names"]["kind"] == kind
    versions = {v["name"]: v for v in crd["spec"]["versions"]}
    assert version in versions, f"{kind}: the CRD has no version {version!r} (has {sorted(versions)})"
    assert versions[version].get("served"), f"{kind} {version} is not served"
    schema = _adapt(versions[version]["schema"]["openAPIV3Schema"])
    jsonschema.Draft4Validator.check_schema(schema)
    return jsonschema.Draft4Validator(schema)


def crd_errors(doc: dict) -> list[str]:
    group, _, version = doc["apiVersion"].rpartition("/")
    assert group == "ray.io", doc["apiVersion"]
    v = crd_validator(doc["kind"], version)
    return [f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
            for e in sorted(v.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path)))]


@pytest.fixture(scope="module")
def crds():
    if not CRD_DIR.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRD_DIR} (reference data kept outside the repo); "
                    "schema validation of k8s/ manifests is not run")
    missing = [f for f in CRD_FILES.values() if not (CRD_DIR / f).is_file()]
    if missing:
        pytest.skip(f"KubeRay CRD files {missing} missing from {CRD_DIR}; schema validation not run")
    return CRD_DIR


def is_kuberay(doc: dict) -> bool:
    return doc.get("apiVersion", "").startswith("ray.io/") and doc.get("kind") in CRD_FILES


def rayjobs(docs: list[dict]) -> list[dict]:
    return [d for d in docs if d.get("kind") == "RayJob"]


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def test_every_yaml_parses_as_kubernetes_objects():
    files = all_yaml_files()
    assert any(f.parent == BASE for f in files), "no manifests in k8s/base"
    for f in files:
        docs = load_docs(f)
        assert docs, f"{f}: empty"
        for d in docs:
            assert d.get("apiVersion") and d.get("kind"), f"{f}: a document without apiVersion/kind"


def test_base_kustomization_lists_every_base_manifest():
    (k,) = load_docs(BASE / "kustomization.yaml")
    listed = {(BASE / r).resolve() for r in k["resources"]}
    present = {p.resolve() for p in BASE.glob("*.y*ml") if not is_kustomization(p)}
    assert listed == present, f"k8s/base/kustomization.yaml resources {sorted(map(str, listed))} != files {sorted(map(str, present))}"


def test_expected_overlays_exist():
    names = {d.name for d in overlay_dirs()}
    assert set(EXPECTED_OVERLAYS) <= names, f"missing overlays: {set(EXPECTED_OVERLAYS) - names}"


@pytest.mark.parametrize("path", [p for p in all_yaml_files() if not is_kustomization(p)],
                         ids=lambda p: str(p.relative_to(K8S)))
def test_manifest_validates_against_crd(crds, path):
    docs = load_docs(path)
    for d in (d for d in docs if d.get("apiVersion", "").startswith("ray.io/")):
        assert d["kind"] in CRD_FILES, f"{path}: no CRD here for ray.io kind {d['kind']!r}"
        errors = crd_errors(d)
        assert not errors, f"{path} ({d['kind']} {d['metadata'].get('name')}):\n" + "\n".join(errors)


def test_some_rayjob_is_validated(crds):
    found = [p for p in all_yaml_files() if not is_kustomization(p) and rayjobs(load_docs(p))]
    assert found, "no RayJob manifest under k8s/"


# --------------------------------------------------------------------------------------------
# Rendered overlays
# --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=[d.name for d in overlay_dirs()] + ["<base>"])
def rendered(request):
    directory = BASE if request.param == "<base>" else OVERLAYS / request.param
    return request.param, render(directory)


def test_rendered_validates_against_crd(crds, rendered):
    name, docs = rendered
    jobs = rayjobs(docs)
    assert len(jobs) == 1, f"{name}: expected one RayJob, rendered {len(jobs)}"
    for d in filter(is_kuberay, docs):
        errors = crd_errors(d)
        assert not errors, f"{name} rendered {d['kind']}:\n" + "\n".join(errors)


def _ops(overlay: Path) -> dict[str, object]:
    """path -> value of every add/replace op in the overlay's patches."""
    (k,) = load_docs(overlay / "kustomization.yaml")
    out = {}
    for p in k.get("patches", []):
        for op in yaml.safe_load(p["patch"] if "patch" in p else (overlay / p["path"]).read_text()):
            if op["op"] in ("add", "replace"):
                out[op["path"]] = op["value"]
    return out


def _config_arg(entrypoint: str) -> str:
    argv = shlex.split(entrypoint)
    assert argv[0] == "nsa-train", f"entrypoint does not run nsa-train: {entrypoint!r}"
    assert argv.count("--config") == 1, f"entrypoint needs exactly one --config: {entrypoint!r}"
    return argv[argv.index("--config") + 1]


def _workers(job: dict) -> dict:
    groups = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert len(groups) == 1, "one GPU worker group expected"
    return groups[0]


def _gpus(container: dict, which: str) -> int:
    return int(container.get("resources", {}).get(which, {}).get("nvidia.com/gpu", 0))


@pytest.mark.parametrize("overlay", sorted(EXPECTED_OVERLAYS))
def test_overlay_renders_expected_workers_and_config(overlay):
    want_workers, want_gpus, want_config = EXPECTED_OVERLAYS[overlay]
    (job,) = rayjobs(render(OVERLAYS / overlay))
    w = _workers(job)
    assert (w["replicas"], w["minReplicas"], w["maxReplicas"]) == (want_workers,) * 3
    assert _gpus(w["template"]["spec"]["containers"][0], "limits") == want_gpus
    assert _config_arg(job["spec"]["entrypoint"]) == want_config
    assert job["metadata"]["name"] == f"nsa-train-{overlay}"


@pytest.mark.parametrize("name", [d.name for d in overlay_dirs()])
def test_overlay_matches_its_own_patches(name):
    """Whatever an overlay says (replicas, config, name) is what the rendered job has."""
    (job,) = rayjobs(render(OVERLAYS / name))
    ops = _ops(OVERLAYS / name)
    w = _workers(job)
    for field in ("replicas", "minReplicas", "maxReplicas"):
        key = f"/spec/rayClusterSpec/workerGroupSpecs/0/{field}"
        assert key in ops, f"overlay {name} does not set {field}"
        assert w[field] == ops[key]
    assert "/spec/entrypoint" in ops, f"overlay {name} does not set the entrypoint"
    assert _config_arg(job["spec"]["entrypoint"]) == _config_arg(ops["/spec/entrypoint"])
    assert job["metadata"]["name"] == ops.get("/metadata/name"), f"overlay {name} keeps the base job name"


def _kustomize_cmd() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@pytest.mark.parametrize("name", [d.name for d in overlay_dirs()])
def test_renderer_agrees_with_kustomize(name):
    """Where kustomize (or kubectl) is installed, the Python renderer's output is exactly its output."""
    cmd = _kustomize_cmd()
    if cmd is None:
        pytest.skip("neither kustomize nor kubectl on PATH: the test renderer is not cross-checked against kustomize")
    out = subprocess.run(cmd + [f"k8s/overlays/{name}"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, f"{' '.join(cmd)} k8s/overlays/{name} failed:\n{out.stderr}"
    key = lambda d: (d["apiVersion"], d["kind"], d["metadata"]["name"])  # noqa: E731
    theirs = sorted((d for d in yaml.safe_load_all(out.stdout) if d), key=key)
    ours = sorted(render(OVERLAYS / name), key=key)
    assert ours == theirs


def test_overlays_are_distinct():
    jobs = {d.name: rayjobs(render(d))[0] for d in overlay_dirs()}
    names = [j["metadata"]["name"] for j in jobs.values()]
    assert len(set(names)) == len(names), f"two overlays render the same RayJob name: {names}"
    outputs = [j["spec"]["entrypoint"] for j in jobs.values()]
    assert len(set(outputs)) == len(outputs)


def test_overlay_configs_exist_in_repo():
    if not (ROOT / "configs").is_dir():
        pytest.skip("configs/ is not in the repository yet (issue 5, item 1): the overlays' config files are not checked")
    for d in overlay_dirs():
        (job,) = rayjobs(render(d))
        cfg = _config_arg(job["spec"]["entrypoint"])
        assert cfg.startswith("/workspace/"), cfg
        assert (ROOT / cfg.removeprefix("/workspace/")).is_file(), f"{d.name}: {cfg} is not in the repo's configs/"


def _pod_templates(job: dict) -> dict[str, dict]:
    rc = job["spec"]["rayClusterSpec"]
    out = {"head": rc["headGroupSpec"]["template"]}
    for g in rc.get("workerGroupSpecs", []):
        out[f"worker:{g['groupName']}"] = g["template"]
    if "submitterPodTemplate" in job["spec"]:
        out["submitter"] = job["spec"]["submitterPodTemplate"]
    return out


def test_rendered_job_is_safe_and_resourced(rendered):
    name, docs = rendered
    (job,) = rayjobs(docs)
    spec = job["spec"]
    assert spec.get("shutdownAfterJobFinishes") is True, f"{name}: shutdownAfterJobFinishes must be true"
    assert isinstance(spec.get("ttlSecondsAfterFinished"), int) and spec["ttlSecondsAfterFinished"] > 0
    pvcs = {d["metadata"]["name"]: d for d in docs if d["kind"] == "PersistentVolumeClaim"}

    for where, tmpl in _pod_templates(job).items():
        pod = tmpl["spec"]
        ctx = f"{name} {where}"
        psc = pod.get("securityContext", {})
        assert psc.get("runAsNonRoot") is True, f"{ctx}: pod securityContext.runAsNonRoot must be true"
        assert psc.get("runAsUser") == 1000, f"{ctx}: pod must run as uid 1000"
        for flag in ("hostNetwork", "hostPID", "hostIPC"):
            assert not pod.get(flag), f"{ctx}: {flag}"
        containers = pod.get("containers", []) + pod.get("initContainers", [])
        assert containers, f"{ctx}: no containers"
        for c in containers:
            cc = f"{ctx} container {c.get('name')}"
            sc = c.get("securityContext", {})
            assert sc.get("privileged") in (None, False), f"{cc}: privileged"
            assert sc.get("allowPrivilegeEscalation") is False, f"{cc}: allowPrivilegeEscalation must be false"
            assert sc.get("runAsNonRoot", True) is True and sc.get("runAsUser", 1000) != 0, f"{cc}: runs as root"
            assert not set(sc.get("capabilities", {}).get("add", [])), f"{cc}: adds capabilities"
            res = c.get("resources", {})
            for kind in ("requests", "limits"):
                for r in ("cpu", "memory"):
                    assert r in res.get(kind, {}), f"{cc}: no {r} in resources.{kind}"
            assert c.get("image"), f"{cc}: no image"

        if where == "submitter":
            continue
        ray = pod["containers"][0]
        mounts = {m["mountPath"]: m["name"] for m in ray.get("volumeMounts", [])}
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        assert "/dev/shm" in mounts, f"{ctx}: no /dev/shm mount"
        shm = volumes[mounts["/dev/shm"]]
        assert shm.get("emptyDir", {}).get("medium") == "Memory", f"{ctx}: /dev/shm is not a memory emptyDir"
        ckpt = [volumes[n] for n in mounts.values() if "persistentVolumeClaim" in volumes.get(n, {})]
        assert ckpt, f"{ctx}: no PersistentVolumeClaim mounted"
        for v in ckpt:
            claim = v["persistentVolumeClaim"]["claimName"]
            assert claim in pvcs, f"{ctx}: claim {claim!r} is not among the rendered resources"
            assert "ReadWriteMany" in pvcs[claim]["spec"]["accessModes"], f"{claim}: head and workers share it"

        if where == "head":
            assert _gpus(ray, "limits") == 0, f"{ctx}: the head should take no GPU"
        else:
            gpus = _gpus(ray, "limits")
            assert gpus > 0, f"{ctx}: no nvidia.com/gpu limit"
            assert _gpus(ray, "requests") in (0, gpus), f"{ctx}: GPU requests must equal limits"

    w = _workers(job)
    assert w["replicas"] == w["minReplicas"] == w["maxReplicas"] >= 1, f"{name}: worker count must be fixed"


def test_rayversion_matches_dockerfile():
    m = re.search(r"^ARG RAY_VERSION=(\S+)", (ROOT / "Dockerfile").read_text(), re.M)
    assert m, "Dockerfile has no ARG RAY_VERSION"
    (job,) = rayjobs(render(BASE))
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == m.group(1)


def test_dockerfile_basics():
    text = (ROOT / "Dockerfile").read_text()
    froms = re.findall(r"^FROM\s+(\S+)", re.sub(r"\$\{?BASE_IMAGE\}?", _base_image(text), text), re.M)
    assert froms, "no FROM"
    for image in froms:
        assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest"), f"base image tag not pinned: {image}"
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1].split(":")[0] in ("1000", "nsa"), "the image must end as the non-root user (uid 1000)"
    assert re.search(r"^WORKDIR\s+/workspace\s*$", text, re.M)
    assert re.search(r"^COPY\b.*\bconfigs/?\s", text, re.M), "configs/ is not copied into the image"
    assert (ROOT / ".dockerignore").is_file()


def _base_image(text: str) -> str:
    m = re.search(r"^ARG BASE_IMAGE=(\S+)", text, re.M)
    return m.group(1) if m else ""


# --------------------------------------------------------------------------------------------
# The checkers themselves: they must fail on bad input, or the tests above prove nothing.
# --------------------------------------------------------------------------------------------
def test_json6902_ops():
    doc = {"a": {"b/c": 1, "l": [1, 2]}, "t~": 0}
    out = apply_json6902(doc, [
        {"op": "replace", "path": "/a/b~1c", "value": 2},
        {"op": "add", "path": "/a/l/-", "value": 3},
        {"op": "add", "path": "/a/l/0", "value": 0},
        {"op": "remove", "path": "/a/l/1"},
        {"op": "add", "path": "/new", "value": {"x": 1}},
        {"op": "replace", "path": "/t~0", "value": 5},
    ])
    assert out == {"a": {"b/c": 2, "l": [0, 2, 3]}, "t~": 5, "new": {"x": 1}}
    assert doc == {"a": {"b/c": 1, "l": [1, 2]}, "t~": 0}, "the input was modified"
    with pytest.raises(KeyError):
        apply_json6902(doc, [{"op": "replace", "path": "/a/missing", "value": 1}])
    with pytest.raises(KeyError):
        apply_json6902(doc, [{"op": "replace", "path": "/a/l/2", "value": 1}])
    with pytest.raises(KeyError):
        apply_json6902(doc, [{"op": "remove", "path": "/nope/x"}])
    for bad in ({"op": "move", "from": "/a", "path": "/b"}, {"op": "test", "path": "/a", "value": 1},
                {"op": "replace", "path": "/a"}, {"op": "add", "path": "a", "value": 1}):
        with pytest.raises(Unsupported):
            apply_json6902(doc, [bad])


def _write_overlay(tmp_path: Path, body: dict) -> Path:
    d = tmp_path / "ov"
    d.mkdir()
    body = {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization",
            "resources": [str(BASE)], **body}
    (d / "kustomization.yaml").write_text(yaml.safe_dump(body))
    return d


TARGET = {"group": "ray.io", "version": "v1", "kind": "RayJob", "name": "nsa-train"}


@pytest.mark.parametrize("body", [
    {"namePrefix": "x-"},
    {"patchesStrategicMerge": ["p.yaml"]},
    {"patches": [{"target": TARGET, "patch": "spec:\n  entrypoint: x\n"}]},  # strategic merge
    {"patches": [{"target": {**TARGET, "name": "other"}, "patch": "- {op: remove, path: /spec}"}]},
    {"patches": [{"target": {**TARGET, "labelSelector": "a=b"}, "patch": "- {op: remove, path: /spec}"}]},
    {"patches": [{"target": TARGET, "patch": "- {op: copy, from: /spec, path: /x}"}]},
    {"images": [{"name": "not-in-the-manifests", "newTag": "v1"}]},
], ids=["namePrefix", "patchesStrategicMerge", "strategic-merge-patch", "no-match", "labelSelector", "copy-op", "image-no-match"])
def test_renderer_rejects_what_it_does_not_implement(tmp_path, body):
    with pytest.raises(Unsupported):
        render(_write_overlay(tmp_path, body))


def test_renderer_images(tmp_path):
    d = _write_overlay(tmp_path, {"images": [{"name": "nsa-parallel", "newName": "registry.example.com/nsa-parallel", "newTag": "v1"}]})
    (job,) = rayjobs(render(d))
    images = {c["image"] for c in _containers(job)}
    assert images == {"registry.example.com/nsa-parallel:v1"}


def _head_container(job: dict) -> dict:
    return job["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]


_BAD_EDITS = {
    "unknown field": lambda j: _workers(j).update(replicaz=4),
    "wrong type": lambda j: _workers(j).update(replicas="four"),
    "missing required field": lambda j: _workers(j).pop("groupName"),
    "map for a list": lambda j: j["spec"]["rayClusterSpec"].update(workerGroupSpecs=_workers(j)),
    "bad quantity": lambda j: _workers(j)["template"]["spec"]["containers"][0]["resources"]["limits"].update(memory="lots"),
    "string for an int": lambda j: _head_container(j)["securityContext"].update(runAsUser="1000"),
}


@pytest.mark.parametrize("what", sorted(_BAD_EDITS))
def test_validator_rejects_bad_rayjobs(crds, what):
    (job,) = rayjobs(render(OVERLAYS / "multi-node-256k"))
    assert not crd_errors(job)
    _BAD_EDITS[what](job)
    assert crd_errors(job), f"the CRD validator accepted a RayJob with a {what}"
