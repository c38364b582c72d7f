"""The KubeRay manifests: what `kubectl kustomize k8s/overlays/<cpu|gpu>` renders is valid,
strict, secure, and runs the CLI this checkout installs.

- KubeRay kinds are checked against the CRD openAPIV3 schemas in ../shared/data/kuberay-crds
  (jsonschema for types/enums/required, plus a strict walk that rejects any field the schema
  does not declare, honouring x-kubernetes-preserve-unknown-fields and additionalProperties —
  what `kubectl apply --validate=strict` does; CEL rules are not evaluated).
- Core kinds, and every pod template embedded in a KubeRay resource, are checked with
  `kubernetes-validate` in strict mode.
- serveConfigV2 is compared with what the real `distilray serve --emit-config` writes for the
  commands in k8s/emit-serve-config.sh, and its app is built against a real local model store;
  RayJob entrypoints run through the real CLI (`distilray train|pipeline ... --dry-run`;
  `distilray tune` is parsed and its config validated).
- The opt-in component k8s/components/scheduled-retraining (a RayCronJob) is rendered the way
  the overlays' comments say to enable it: it adds only the RayCronJob, whose job template is
  the pipeline RayJob's spec.
"""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from tests.conftest import REPO, shared_path

OVERLAYS = ("cpu", "gpu")
RETRAINING = "scheduled-retraining"  # opt-in component: k8s/components/scheduled-retraining
WITH_RETRAINING = tuple(f"{o}+{RETRAINING}" for o in OVERLAYS)
# KubeRay v1.7.0 name limits (utils.MaxRay*NameLength): RayJob and RayService clusters append
# 6 characters, a RayCronJob's RayJobs append -<minutes since the epoch>.
MAX_NAME = {"RayCluster": 53, "RayJob": 47, "RayService": 47, "RayCronJob": 36}
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml", "RayCronJob": "ray.io_raycronjobs.yaml"}
K8S_VERSIONS = ("1.30.0", "1.37.0")  # oldest Kubernetes we claim, newest the validator knows
# The serve config each overlay must carry, by the --emit-config path in emit-serve-config.sh.
SERVE_CONFIG_SOURCE = {"cpu": "k8s/base/serve-config.yaml",
                       "gpu": "k8s/components/gpu/serve-config.yaml"}
# Mount points in the pods → stand-ins on this machine for running the entrypoints here.
IMAGE_WORKDIR = "/app"
STORAGE_MOUNT = "/mnt/distilray"
OBJECT_META_KEYS = {"name", "namespace", "labels", "annotations"}
RUNTIME_ENV_KEYS = {"working_dir", "py_modules", "pip", "uv", "conda", "env_vars", "excludes",
                    "container", "image_uri", "config", "py_executable", "java_jars", "nsight"}


# --------------------------------------------------------------------------- rendering


@functools.cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    """`kubectl kustomize k8s/overlays/<overlay>`; `<overlay>+<component>`: that overlay with
    the component enabled as its comments say (listed before components/cluster-spec)."""
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl (with built-in kustomize) is not installed")
    name, _, component = overlay.partition("+")
    with tempfile.TemporaryDirectory(prefix="k8s-overlay-") as tmp:
        root = REPO / "k8s" / "overlays" / name
        if component:
            root = Path(tmp)
            (root / "kustomization.yaml").write_text(yaml.safe_dump(
                overlay_with_component(name, component, root)))
        out = subprocess.run([kubectl, "kustomize", str(root)],
                             capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = tuple(d for d in yaml.safe_load_all(out.stdout) if d)
    assert docs, f"overlay {overlay} rendered nothing"
    return docs


def overlay_with_component(overlay: str, component: str, where: Path) -> dict[str, Any]:
    """overlays/<overlay>/kustomization.yaml with the commented-out `components` lines its
    comments offer uncommented (what a user does to enable `component`), its paths made
    relative to `where` (kustomize takes only relative paths)."""
    src = REPO / "k8s" / "overlays" / overlay
    text = re.sub(r"^(\s*)# ?(\s*(components:|- \.\./\.\./components/\S+).*)$", r"\1\2",
                  (src / "kustomization.yaml").read_text(), flags=re.M)
    kust = yaml.safe_load(text)
    wanted = f"../../components/{component}"
    assert wanted in kust["components"], f"overlays/{overlay} does not offer {component}"
    # listed before cluster-spec, so the copies it needs are made after it adds its resource
    assert kust["components"][-1] == "../../components/cluster-spec"

    def moved(path: str) -> str:
        return os.path.relpath((src / path).resolve(), where)

    kust["resources"] = [moved(r) for r in kust["resources"]]
    kust["components"] = [moved(c) for c in kust["components"]]
    assert all("path" not in p for p in kust.get("patches", [])), "move patch files too"
    return kust


def of_kind(docs, kind: str) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] == kind]


def by_name(docs, kind: str, name: str) -> dict[str, Any]:
    (doc,) = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    return doc


# --------------------------------------------------------------------------- CRD schemas


@functools.cache
def crd_schema(kind: str, version: str) -> dict[str, Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are ~1 MB each
    crd = yaml.load(shared_path("kuberay-crds", CRD_FILES[kind]).read_text(), Loader=loader)
    assert crd["spec"]["names"]["kind"] == kind
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            assert v["served"], f"{kind} {version} is not served"
            return v["schema"]["openAPIV3Schema"]
    raise AssertionError(f"CRD {kind} has no version {version}")


def _branches(schema: dict[str, Any]) -> list[dict[str, Any]]:
    out = [schema]
    for key in ("allOf", "anyOf", "oneOf"):
        for sub in schema.get(key, []):
            out.extend(_branches(sub))
    return out


def unknown_fields(value: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Every field of `value` that `schema` does not declare (the API server would drop it)."""
    problems: list[str] = []
    branches = _branches(schema)
    preserve = any(b.get("x-kubernetes-preserve-unknown-fields") for b in branches)
    if isinstance(value, dict):
        props: dict[str, Any] = {}
        additional: Any = None
        for b in branches:
            props.update(b.get("properties", {}))
            if "additionalProperties" in b:
                additional = b["additionalProperties"]
        for key, sub in value.items():
            where = f"{path}.{key}" if path else key
            if key in props:
                problems += unknown_fields(sub, props[key], where)
            elif isinstance(additional, dict):
                problems += unknown_fields(sub, additional, where)
            elif additional is True or preserve:
                continue
            else:
                problems.append(f"{where}: unknown field")
    elif isinstance(value, list):
        items = next((b["items"] for b in branches if isinstance(b.get("items"), dict)), None)
        if items is not None:
            for i, sub in enumerate(value):
                problems += unknown_fields(sub, items, f"{path}[{i}]")
    return problems


def crd_problems(doc: dict[str, Any]) -> list[str]:
    group, _, version = doc["apiVersion"].partition("/")
    assert group == "ray.io", doc["apiVersion"]
    schema = crd_schema(doc["kind"], version)
    problems = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}"
                for e in jsonschema.Draft7Validator(schema).iter_errors(doc)]
    body = {k: v for k, v in doc.items() if k != "metadata"}
    problems += unknown_fields(body, schema)
    problems += [f"metadata.{k}: unknown field" for k in doc["metadata"]
                 if k not in OBJECT_META_KEYS]
    if not re.fullmatch(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?", doc["metadata"]["name"]):
        problems.append(f"metadata.name {doc['metadata']['name']!r} is not a DNS-1123 label")
    return problems


def core_problems(doc: dict[str, Any], version: str) -> list[str]:
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, version, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.absolute_path)) or '<root>'}: {exc.message}"]
    return []


# --------------------------------------------------------------------------- pod templates


def job_spec(doc: dict[str, Any]) -> dict[str, Any] | None:
    """The RayJob spec of a RayJob, or the one a RayCronJob creates its RayJobs from."""
    return {"RayJob": doc.get("spec"),
            "RayCronJob": doc.get("spec", {}).get("jobTemplate")}.get(doc["kind"])


def cluster_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc.get("spec", {})
    if doc["kind"] in ("RayJob", "RayCronJob"):
        return [job_spec(doc).get("rayClusterSpec")]  # type: ignore[union-attr]
    return {"RayCluster": [spec], "RayService": [spec.get("rayClusterConfig")]}.get(doc["kind"], [])


def pod_templates(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for cs in cluster_specs(doc):
        assert cs, f"{doc['kind']} {doc['metadata']['name']} has no cluster spec"
        out.append(("head", cs["headGroupSpec"]["template"]))
        out += [(f"worker group {g['groupName']}", g["template"]) for g in cs["workerGroupSpecs"]]
    job = job_spec(doc)
    if job and "submitterPodTemplate" in job:
        out.append(("job submitter", job["submitterPodTemplate"]))
    return out


def containers(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    out = [(f"{where}/{c['name']}", c) for where, tpl in pod_templates(doc)
           for c in tpl["spec"].get("initContainers", []) + tpl["spec"]["containers"]]
    for cs in cluster_specs(doc):
        if cs.get("enableInTreeAutoscaling"):
            out.append(("autoscaler", cs["autoscalerOptions"]))
    return out


# --------------------------------------------------------------------------- schema tests


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_the_expected_resources(overlay):
    kinds = sorted((d["kind"], d["metadata"]["name"]) for d in render(overlay))
    assert kinds == sorted([
        ("Namespace", "distilray"), ("PersistentVolumeClaim", "distilray-storage"),
        ("NetworkPolicy", "distilray-ray-internal"), ("NetworkPolicy", "distilray-serve-clients"),
        ("RayCluster", "distilray-dev"), ("RayJob", "distilray-train"), ("RayJob", "distilray-tune"),
        ("RayJob", "distilray-pipeline"), ("RayService", "distilray-serve")])
    # local-config sources (the cluster template, the serve-config ConfigMap) are not deployed
    for doc in render(overlay):
        assert "config.kubernetes.io/local-config" not in doc["metadata"].get("annotations", {})
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == "distilray"


@pytest.mark.parametrize("overlay", OVERLAYS + WITH_RETRAINING)
def test_kuberay_resources_validate_against_the_crds_strictly(overlay):
    docs = [d for d in render(overlay) if d["kind"] in CRD_FILES]
    kinds = {"RayCluster", "RayJob", "RayService"} | ({"RayCronJob"} if "+" in overlay else set())
    assert {d["kind"] for d in docs} == kinds
    problems = {f"{d['kind']}/{d['metadata']['name']}": crd_problems(d) for d in docs}
    assert problems == {k: [] for k in problems}
    for d in docs:  # longer names pass the schema but KubeRay refuses them
        assert len(d["metadata"]["name"]) <= MAX_NAME[d["kind"]], d["metadata"]["name"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_scheduled_retraining_adds_only_a_raycronjob_that_runs_the_pipeline_rayjob(overlay):
    """Enabling the component changes nothing else; each week's RayJob is the pipeline RayJob
    (entrypoint, GPU patch, cluster spec, submitter) and the schedule is what KubeRay takes."""
    plain, with_cron = render(overlay), render(f"{overlay}+{RETRAINING}")
    assert not of_kind(plain, "RayCronJob")
    (cron,) = of_kind(with_cron, "RayCronJob")
    key = lambda docs: {(d["kind"], d["metadata"]["name"]): d for d in docs}  # noqa: E731
    assert key(d for d in with_cron if d["kind"] != "RayCronJob") == key(plain)
    assert cron["metadata"] == {"name": "distilray-retrain", "namespace": "distilray",
                                "labels": {"app.kubernetes.io/name": "distilray"}}
    pipeline = by_name(plain, "RayJob", "distilray-pipeline")
    assert cron["spec"]["jobTemplate"] == pipeline["spec"]
    assert cron["spec"]["jobTemplate"]["rayClusterSpec"] == \
        by_name(plain, "RayJob", "distilray-train")["spec"]["rayClusterSpec"]
    spec = cron["spec"]
    minute, hour, day, month, weekday = spec["schedule"].split()  # 5 fields: cron.ParseStandard
    assert (minute, hour, day, month, weekday) == ("0", "3", "*", "*", "1")  # weekly, Monday
    assert spec["timeZone"] == "Etc/UTC" and spec["suspend"] is False
    import zoneinfo

    zoneinfo.ZoneInfo(spec["timeZone"])  # KubeRay refuses a zone time.LoadLocation does not know
    if overlay == "gpu":
        argv = shlex.split(spec["jobTemplate"]["entrypoint"])
        assert "--gpu" in argv and "train.mixed_precision=bf16" in argv


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_core_resources_and_embedded_pod_templates_validate_strictly(overlay, version):
    problems: dict[str, list[str]] = {}
    for doc in render(overlay):
        name = f"{doc['kind']}/{doc['metadata']['name']}"
        if doc["kind"] not in CRD_FILES:
            problems[name] = core_problems(doc, version)
            continue
        for where, tpl in pod_templates(doc):
            wrapped = {"apiVersion": "v1", "kind": "PodTemplate",
                       "metadata": {"name": "check"}, "template": tpl}
            problems[f"{name} {where}"] = core_problems(wrapped, version)
    assert len(problems) >= 4 + 4 * 2
    assert problems == {k: [] for k in problems}


def test_strict_checks_reject_unknown_and_misspelt_fields():
    """The validators above can fail: typos the API server would silently drop are caught."""
    docs = render("gpu")
    job = copy.deepcopy(by_name(docs, "RayJob", "distilray-train"))
    job["spec"]["shutdownAfterJobFinish"] = True
    worker = job["spec"]["rayClusterSpec"]["workerGroupSpecs"][1]["template"]["spec"]
    worker["containers"][0]["imagePullPolice"] = "Always"
    job["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0
    problems = crd_problems(job)
    assert "spec.shutdownAfterJobFinish: unknown field" in problems
    assert ("spec.rayClusterSpec.workerGroupSpecs[1].template.spec.containers[0]."
            "imagePullPolice: unknown field") in problems
    assert any("rayStartParams.num-cpus" in p and "not of type 'string'" in p for p in problems)
    # rayStartParams is a string map: any key is allowed, values are still checked
    ok = copy.deepcopy(by_name(docs, "RayJob", "distilray-train"))
    ok["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["any-flag"] = "x"
    assert crd_problems(ok) == []

    policy = copy.deepcopy(by_name(docs, "NetworkPolicy", "distilray-serve-clients"))
    policy["spec"]["ingress"][0]["port"] = 8000
    assert core_problems(policy, K8S_VERSIONS[-1])


# --------------------------------------------------------------------------- what the manifests say


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_non_root_read_only_and_bounded(overlay):
    seen = 0
    for doc in render(overlay):
        for where, tpl in pod_templates(doc):
            pod_sc = tpl["spec"].get("securityContext", {})
            assert pod_sc.get("runAsNonRoot") is True, where
            assert pod_sc.get("runAsUser", 0) != 0, where
            assert tpl["metadata"]["labels"]["app.kubernetes.io/part-of"] == "distilray", where
        for where, c in containers(doc):
            seen += 1
            label = f"{doc['kind']}/{doc['metadata']['name']} {where}"
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False, label
            assert sc["readOnlyRootFilesystem"] is True, label
            assert sc["capabilities"]["drop"] == ["ALL"], label
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{label}: Ray needs a writable /tmp"
            for kind in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][kind]), f"{label} {kind}"
            if where.endswith(("ray-head", "ray-worker")):
                assert {"/home/ray/.cache", STORAGE_MOUNT} <= mounts, label
                # Ray sizes the node from the limits; memory requests == limits avoids OOM kills
                assert c["resources"]["requests"]["memory"] == c["resources"]["limits"]["memory"]
    assert seen >= 4 * 3


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_ray_clusters_use_token_auth_autoscaling_and_shared_storage(overlay):
    for doc in of_kind(render(overlay), "RayCluster") + of_kind(render(overlay), "RayJob") + \
            of_kind(render(overlay), "RayService"):
        for cs in cluster_specs(doc):
            assert cs["authOptions"] == {"mode": "token", "secretName": "distilray-ray-token"}
            assert cs["enableInTreeAutoscaling"] is True
            for group in cs["workerGroupSpecs"]:
                assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
                assert group["maxReplicas"] >= 2
            claims = {v["persistentVolumeClaim"]["claimName"]
                      for _, tpl in pod_templates(doc) for v in tpl["spec"].get("volumes", [])
                      if "persistentVolumeClaim" in v}
            assert claims == {"distilray-storage"}
    pvc = by_name(render(overlay), "PersistentVolumeClaim", "distilray-storage")
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_ray_container_runs_serve_in_high_throughput_mode(overlay):
    """Every Ray process reads these at start, so every head and worker container sets them."""
    from distilray.runtime import SERVE_HIGH_THROUGHPUT_ENV

    for doc in of_kind(render(overlay), "RayCluster") + of_kind(render(overlay), "RayJob") + \
            of_kind(render(overlay), "RayService"):
        for where, tpl in pod_templates(doc):
            if where == "job submitter":
                continue
            for c in tpl["spec"]["containers"]:
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                assert {k: env.get(k) for k in SERVE_HIGH_THROUGHPUT_ENV} == \
                    SERVE_HIGH_THROUGHPUT_ENV, f"{doc['metadata']['name']} {where}/{c['name']}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayjobs_clean_up_after_themselves(overlay):
    jobs = of_kind(render(overlay), "RayJob")
    assert {j["metadata"]["name"] for j in jobs} == {"distilray-train", "distilray-tune",
                                                     "distilray-pipeline"}
    # a retry of the pipeline would train again under a new name; a refused gate is final
    assert by_name(jobs, "RayJob", "distilray-pipeline")["spec"]["backoffLimit"] == 0
    for job in jobs:
        spec = job["spec"]
        assert spec["shutdownAfterJobFinishes"] is True
        assert spec["ttlSecondsAfterFinished"] > 0
        assert spec["backoffLimit"] >= 0
        assert spec["entrypoint"].startswith("distilray ")
        runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
        assert isinstance(runtime_env, dict) and set(runtime_env) <= RUNTIME_ENV_KEYS


def test_gpu_overlay_adds_a_gpu_worker_group_and_gpu_entrypoints():
    docs = render(f"gpu+{RETRAINING}")
    for doc in docs:
        for cs in cluster_specs(doc):
            groups = {g["groupName"]: g for g in cs["workerGroupSpecs"]}
            assert set(groups) == {"cpu", "gpu"}
            gpu = groups["gpu"]["template"]["spec"]
            res = gpu["containers"][0]["resources"]
            assert res["limits"]["nvidia.com/gpu"] == res["requests"]["nvidia.com/gpu"] == "1"
            assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} \
                in gpu["tolerations"]
            assert gpu["nodeSelector"]
            # long-lived clusters hold GPU pods only while needed; job clusters start with theirs
            want = 2 if doc["kind"] in ("RayJob", "RayCronJob") else 0
            assert groups["gpu"]["minReplicas"] == groups["gpu"]["replicas"] == want, doc["kind"]
            assert "nvidia.com/gpu" not in str(groups["cpu"])
    for name in ("distilray-train", "distilray-pipeline"):
        argv = shlex.split(by_name(docs, "RayJob", name)["spec"]["entrypoint"])
        assert "--gpu" in argv and "train.mixed_precision=bf16" in argv, name
    assert "train.use_gpu=true" in shlex.split(by_name(docs, "RayJob", "distilray-tune")["spec"]["entrypoint"])
    for doc in render(f"cpu+{RETRAINING}"):
        assert "nvidia.com/gpu" not in str(doc) and "--gpu" not in str(doc)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_network_policies_open_only_serve_to_clients(overlay):
    docs = render(overlay)
    internal = by_name(docs, "NetworkPolicy", "distilray-ray-internal")["spec"]
    same_app = {"podSelector": {"matchLabels": {"app.kubernetes.io/part-of": "distilray"}}}
    assert internal["ingress"][0] == {"from": [same_app]}  # Ray nodes: every port, only each other
    operator = internal["ingress"][1]
    assert {p["port"] for p in operator["ports"]} == {8265, 52365}
    assert operator["from"][0]["podSelector"]["matchLabels"] == \
        {"app.kubernetes.io/name": "kuberay-operator"}
    serve = by_name(docs, "NetworkPolicy", "distilray-serve-clients")["spec"]
    assert serve["podSelector"]["matchLabels"]["ray.io/serve"] == "true"
    assert serve["ingress"] == [{"ports": [{"protocol": "TCP", "port": 8000}]}]  # from anywhere
    assert len(internal["ingress"]) == 2 and "egress" not in internal


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayservice_upgrades_without_downtime_and_autoscales(overlay):
    svc = by_name(render(overlay), "RayService", "distilray-serve")["spec"]
    assert svc["upgradeStrategy"]["type"] in ("NewCluster", "NewClusterWithIncrementalUpgrade")
    config = yaml.safe_load(svc["serveConfigV2"])
    (app,) = config["applications"]
    # the model deployment autoscales (an ingress in front of it, if any, may be fixed-size)
    (deployment,) = [d for d in app["deployments"] if "autoscaling_config" in d]
    scaling = deployment["autoscaling_config"]
    assert 1 <= scaling["min_replicas"] < scaling["max_replicas"]
    assert deployment["max_ongoing_requests"] > scaling["target_ongoing_requests"]
    assert config["http_options"]["host"] == "0.0.0.0" and config["http_options"]["port"] == 8000
    head = svc["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert {"containerPort": 8000, "name": "serve"} in head["ports"]
    assert app["args"]["model"].startswith(STORAGE_MOUNT + "/")
    gpus = deployment["ray_actor_options"].get("num_gpus", 0)
    assert (gpus >= 1) == (overlay == "gpu")


# --------------------------------------------------------------------------- versions


def test_ray_version_is_pinned_the_same_everywhere():
    installed = importlib.metadata.version("ray")
    dockerfile = (REPO / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=rayproject/ray:([0-9.]+)-py311-cpu$", dockerfile, re.M)
    assert base, "Dockerfile must default RAY_IMAGE to an official rayproject/ray py311 tag"
    pins = set(re.findall(r"ray\[[a-z,]+\]==([0-9.]+)", dockerfile))
    gpu_tags = set(re.findall(r"rayproject/ray:([0-9.]+)-py311-gpu", dockerfile))
    rendered = {cs["rayVersion"] for o in OVERLAYS for d in render(o) for cs in cluster_specs(d)}
    assert {base.group(1)} == pins == gpu_tags == rendered == {installed}
    launcher = yaml.safe_load((REPO / "cluster" / "aws-gpu.yaml").read_text())
    assert launcher["docker"]["image"].endswith("-gpu")


# --------------------------------------------------------------------------- serveConfigV2


def emit_commands() -> list[list[str]]:
    """The `distilray serve ... --emit-config PATH` commands of k8s/emit-serve-config.sh."""
    text = (REPO / "k8s" / "emit-serve-config.sh").read_text().replace("\\\n", " ")
    cmds = [shlex.split(line) for line in text.splitlines() if line.startswith("distilray serve ")]
    assert cmds, "k8s/emit-serve-config.sh has no `distilray serve` command"
    return cmds


def run_emit(cmd: list[str], out: Path) -> str:
    argv = list(cmd)
    i = argv.index("--emit-config")
    argv[i + 1] = str(out)
    proc = subprocess.run([sys.executable, "-m", "distilray", *argv[1:]], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return out.read_text()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_config_is_what_distilray_serve_emits(overlay, tmp_path):
    (cmd,) = [c for c in emit_commands() if c[c.index("--emit-config") + 1] == SERVE_CONFIG_SOURCE[overlay]]
    emitted = run_emit(cmd, tmp_path / "serve.yaml")
    rendered = by_name(render(overlay), "RayService", "distilray-serve")["spec"]["serveConfigV2"]
    assert yaml.safe_load(rendered) == yaml.safe_load(emitted)
    assert rendered == emitted  # byte for byte: the committed file is fresh, not hand-edited
    assert (REPO / SERVE_CONFIG_SOURCE[overlay]).read_text() == emitted


def bound_bundle(app: Any) -> dict[str, str] | None:
    """The model-store bundle ({store, name, version, ...}) an application's replicas load."""
    for arg in app._bound_deployment.init_args:
        if isinstance(arg, dict) and "version" in arg:
            return arg
        if hasattr(arg, "_bound_deployment"):
            found = bound_bundle(arg)
            if found:
                return found
    return None


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_serve_import_path_builds_the_app_from_the_production_version(overlay, tmp_path):
    """Against a real store on a stand-in for the claim: the app pins the version production
    points at when it is built, so after a promotion the next build serves the new version
    with the same serveConfigV2; before any promotion the build fails naming the alias."""
    from ray.serve import Application

    from distilray.errors import BundleError
    from distilray.store import ModelStore, write_bundle
    from tests.conftest import save_tiny_checkpoint

    config = yaml.safe_load(by_name(render(overlay), "RayService", "distilray-serve")
                            ["spec"]["serveConfigV2"])
    (app,) = config["applications"]
    module, _, attr = app["import_path"].partition(":")
    assert module.startswith("distilray.")
    builder = getattr(importlib.import_module(module), attr)
    assert app["args"]["model"] == f"{STORAGE_MOUNT}/models/sst2@production"
    args = {**app["args"], "model": app["args"]["model"].replace(STORAGE_MOUNT, str(tmp_path))}
    store = ModelStore(str(tmp_path / "models"))
    with pytest.raises(BundleError, match="no such alias"):
        builder(args)
    for seed in (1, 2):
        ckpt = save_tiny_checkpoint(tmp_path / f"ckpt-{seed}", f"tiny-{seed}", seed=seed)
        version = store.publish("sst2", lambda d, c=ckpt: write_bundle(c, d, {}))
        store.set_alias("sst2", "production", version, "promote")
        # The builder validates the args exactly as a replica would and binds the deployment.
        built = builder(args)
        assert isinstance(built, Application)
        assert bound_bundle(built) == {"store": str(tmp_path / "models"), "name": "sst2",
                                       "version": f"v{seed}", "requested": args["model"]}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_rayservice_serves_what_the_pipeline_promotes(overlay):
    """The RayService's model is the store, name and alias the pipeline RayJob promotes to."""
    from distilray.cli import check_entrypoint
    from distilray.config import load_config

    docs = render(overlay)
    entry = by_name(docs, "RayJob", "distilray-pipeline")["spec"]["entrypoint"]
    args = check_entrypoint(shlex.join(localise(entry, {IMAGE_WORKDIR + "/": str(REPO) + "/"})))
    p = load_config(args.config, args.overrides).pipeline
    served = yaml.safe_load(by_name(docs, "RayService", "distilray-serve")["spec"]["serveConfigV2"])
    (app,) = served["applications"]
    assert app["args"]["model"] == f"{args.store}/{p.model}@{p.alias}"
    assert args.store == f"{STORAGE_MOUNT}/models" and p.alias == "production"
    assert p.minimum and p.tolerance > 0  # a gate, not an unconditional promotion


# --------------------------------------------------------------------------- RayJob entrypoints


@pytest.fixture(scope="module")
def pod_paths(tmp_path_factory) -> dict[str, str]:
    """Local stand-ins for the image's /app and the claim at /mnt/distilray (data + results)."""
    storage = tmp_path_factory.mktemp("mnt-distilray")
    (storage / "data").mkdir()
    (storage / "data" / "sst2").symlink_to(shared_path("sst2"), target_is_directory=True)
    return {IMAGE_WORKDIR + "/": str(REPO) + "/", STORAGE_MOUNT: str(storage)}


def localise(entrypoint: str, paths: dict[str, str]) -> list[str]:
    argv = shlex.split(entrypoint)
    out = []
    for arg in argv:
        for pod, local in paths.items():
            arg = arg.replace(pod, local)
        out.append(arg)
    return out


def all_entrypoints(stage: str) -> list[tuple[str, str]]:
    return [(o, j["spec"]["entrypoint"]) for o in OVERLAYS for j in of_kind(render(o), "RayJob")
            if shlex.split(j["spec"]["entrypoint"])[1] == stage]


@pytest.mark.slow
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_train_entrypoints_pass_the_cli_dry_run(overlay, pod_paths):
    (entry,) = [e for o, e in all_entrypoints("train") if o == overlay]
    argv = localise(entry, pod_paths)
    assert argv[0] == "distilray" and "--dry-run" not in argv
    env = {**os.environ, "RAY_ADDRESS": ""}
    proc = subprocess.run([sys.executable, "-m", "distilray", *argv[1:], "--dry-run"], cwd="/",
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dry run OK" in proc.stdout
    assert f"checkpoints under {pod_paths[STORAGE_MOUNT]}/results/sst2" in proc.stdout


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_pipeline_entrypoints_pass_the_cli_dry_run_with_new_run_names(overlay, pod_paths):
    """`distilray pipeline --dry-run` checks config, store and names; each run is named anew."""
    from distilray.cli import check_entrypoint

    (entry,) = [e for o, e in all_entrypoints("pipeline") if o == overlay]
    argv = localise(entry, pod_paths)
    args = check_entrypoint(shlex.join(argv))  # parses with the real parser, loads the config
    assert args.command == "pipeline" and args.workers == 2 and args.gpu == (overlay == "gpu")
    env = {**os.environ, "RAY_ADDRESS": ""}
    runs = []
    for _ in range(2):
        proc = subprocess.run([sys.executable, "-m", "distilray", *argv[1:], "--dry-run"], cwd="/",
                              capture_output=True, text=True, timeout=120, env=env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        store = f"{pod_paths[STORAGE_MOUNT]}/models"
        assert f"dry run OK: train → evaluate + gate → promote to {store}/sst2@production" \
            in proc.stdout
        runs.append(re.search(r"runs named like (\S+)", proc.stdout).group(1))  # type: ignore[union-attr]
    assert all(re.fullmatch(r"sst2-pipeline-\d{8}-\d{6}-[0-9a-f]{8}", r) for r in runs), runs
    assert runs[0] != runs[1]


@pytest.mark.slow
def test_pipeline_training_stage_passes_the_train_dry_run(pod_paths):
    """The pipeline's training run (its config and the entrypoint's flags) as `distilray train
    --dry-run`: the data on the claim loads, the model builds, the workers fit."""
    from distilray.cli import check_entrypoint

    (entry,) = [e for o, e in all_entrypoints("pipeline") if o == "cpu"]
    args = check_entrypoint(shlex.join(localise(entry, pod_paths)))
    argv = ["train", "--config", args.config, "--workers", str(args.workers),
            "--storage-path", args.storage_path, *[a for o in args.overrides for a in ("--set", o)]]
    proc = subprocess.run([sys.executable, "-m", "distilray", *argv, "--dry-run"], cwd="/",
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "RAY_ADDRESS": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "dry run OK" in proc.stdout


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_tune_entrypoints_parse_and_pass_the_tune_checks(overlay, pod_paths):
    """`distilray tune` has no --dry-run: parse with the real parser, load the config, and run
    the checks `distilray tune` makes before it starts Ray (space, search, scheduler)."""
    from distilray.cli import build_parser, check_entrypoint
    from distilray.config import apply_overrides, load_config
    from distilray.tune.space import check_tune_config

    (entry,) = [e for o, e in all_entrypoints("tune") if o == overlay]
    argv = localise(entry, pod_paths)
    args = check_entrypoint(shlex.join(argv))  # parses with the real parser, loads the config
    assert args.command == "tune" and args.name == "sst2-search"
    cfg = apply_overrides(load_config(args.config, args.overrides),
                          {"tune.name": args.name, "tune.storage_path": args.storage_path})
    check_tune_config(cfg)
    assert cfg.data.dataset == f"{pod_paths[STORAGE_MOUNT]}/data/sst2"
    assert (Path(cfg.data.dataset) / "validation.parquet").exists()
    tune_parser = build_parser()._subparsers._group_actions[0].choices["tune"]  # type: ignore[union-attr]
    assert any("--dry-run" in a.option_strings for a in tune_parser._actions)
    proc = subprocess.run([sys.executable, "-m", "distilray", *argv[1:], "--dry-run"], cwd="/",
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "RAY_ADDRESS": ""})
    if overlay == "gpu" and not _local_gpus():  # the dry run checks the cluster it would use
        assert proc.returncode == 2 and "1 GPU" in proc.stderr and "0 GPU" in proc.stderr, proc.stderr[-3000:]
    else:
        assert proc.returncode == 0, proc.stderr[-3000:]


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def test_entrypoint_check_refuses_what_cannot_run(pod_paths):
    from distilray.cli import check_entrypoint
    from distilray.errors import ConfigError

    (_, entry), = [(o, e) for o, e in all_entrypoints("tune") if o == "cpu"]
    good = localise(entry, pod_paths)
    assert "tune.max_concurrent_trials=4" in good
    with pytest.raises(ConfigError, match="unknown key 'tune.max_concurent_trials'"):
        check_entrypoint(shlex.join(good).replace("concurrent", "concurent"))
    with pytest.raises(ConfigError, match="does not parse"):
        check_entrypoint(shlex.join(good) + " --teacher x")  # tune has no --teacher
    with pytest.raises(ConfigError, match="cannot read config file"):
        check_entrypoint(shlex.join(good).replace("sst2-minilm.yaml", "nope.yaml"))


def _cpu(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_job_clusters_start_with_what_the_train_preflight_demands(overlay, pod_paths):
    """`distilray train` refuses a run the cluster cannot place when it starts (CPUs, GPUs):
    each RayJob's cluster must already hold its workers, one per pod, with a CPU to spare
    for the Ray Data tasks that feed them."""
    from distilray.cli import check_entrypoint
    from distilray.config import load_config

    for job in of_kind(render(overlay), "RayJob"):
        args = check_entrypoint(shlex.join(localise(job["spec"]["entrypoint"], pod_paths)))
        flags = []
        if getattr(args, "workers", None):
            flags.append(f"train.num_workers={args.workers}")
        if getattr(args, "gpu", False):
            flags.append("train.use_gpu=true")
        tc = load_config(args.config, [*args.overrides, *flags]).train
        cs = job["spec"]["rayClusterSpec"]
        assert cs["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"  # nothing runs on the head
        cpus = gpus = 0.0
        for group in cs["workerGroupSpecs"]:
            limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
            cpus += group["replicas"] * _cpu(limits["cpu"])
            gpus += group["replicas"] * float(limits.get("nvidia.com/gpu", 0))
            assert tc.cpus_per_worker <= _cpu(limits["cpu"]) - 1, group["groupName"]
        name = job["metadata"]["name"]
        assert tc.num_workers * tc.cpus_per_worker <= cpus, name
        assert tc.use_gpu == (overlay == "gpu"), name
        if tc.use_gpu:
            assert tc.num_workers * tc.gpus_per_worker <= gpus, name
