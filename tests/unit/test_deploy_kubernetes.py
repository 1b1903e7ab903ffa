"""deploy/kubernetes: every manifest is schema-valid (kubernetes-validate, strict) for the
oldest and newest Kubernetes we target, and the DaemonSet has the shape the agent needs:
host mounts and their propagation, probes, RBAC, capabilities, scheduling.

Some API-server rules are not in the OpenAPI schemas (Bidirectional propagation only in
privileged containers, mounts naming declared volumes); those are asserted here too."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import kubernetes_validate.utils
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "kubernetes"

# securityContext.appArmorProfile is GA (and in the schema) from 1.30 on.
OLDEST_KUBERNETES = "1.30"
# The newest version whose schemas the installed kubernetes-validate ships.
NEWEST_KUBERNETES = kubernetes_validate.utils.major_minor(kubernetes_validate.utils.latest_version())
VERSIONS = sorted({OLDEST_KUBERNETES, NEWEST_KUBERNETES})

AGENT_CAPABILITIES = {"BPF", "NET_ADMIN", "SYS_ADMIN", "SYS_RESOURCE"}
METRICS_PORT = 9464
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


def load_file(name):
    return [doc for doc in yaml.safe_load_all((K8S / name).read_text()) if doc]


def kustomization():
    return yaml.safe_load((K8S / "kustomization.yaml").read_text())


def kustomized_objects():
    return [obj for name in kustomization()["resources"] for obj in load_file(name)]


def the(kind, objects=None):
    found = [o for o in (objects or kustomized_objects()) if o["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, found {len(found)}"
    return found[0]


def pod_spec(kind="DaemonSet", objects=None):
    return the(kind, objects)["spec"]["template"]["spec"]


def agent_container():
    (agent,) = [c for c in pod_spec()["containers"] if c["name"] == "agent"]
    return agent


def all_containers(spec):
    return spec.get("initContainers", []) + spec["containers"]


def host_mounts(spec, container):
    """{host path: volumeMount} for the container's hostPath volumes."""
    volumes = {v["name"]: v for v in spec["volumes"]}
    return {volumes[m["name"]]["hostPath"]["path"]: m for m in container.get("volumeMounts", [])
            if "hostPath" in volumes[m["name"]]}


def metrics_addr_port(container):
    args = container["args"]
    return int(args[args.index("--metrics-addr") + 1].rsplit(":", 1)[1])


def cleanup_job():
    (job,) = load_file("cleanup-job.yaml")
    return job


def test_kustomization_lists_every_manifest_except_the_cleanup_job():
    listed = set(kustomization()["resources"])
    on_disk = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert "cleanup-job.yaml" not in listed
    assert listed == on_disk - {"cleanup-job.yaml"}


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("filename", sorted(p.name for p in K8S.glob("*.yaml")
                                            if p.name != "kustomization.yaml"))
def test_manifest_is_valid_in_strict_mode(filename, version):
    for obj in load_file(filename):
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            where = ".".join(str(p) for p in e.path)
            pytest.fail(f"{filename}: {obj['kind']}/{obj['metadata']['name']} is not valid for "
                        f"Kubernetes {version}: {where}: {e.message}")


def test_strict_validation_rejects_a_misspelled_field():
    # The validator is the test's eyes: make sure it sees a typo in a nested field.
    ds = the("DaemonSet")
    ds["spec"]["template"]["spec"]["containers"][0]["securityContext"]["readOnlyRootFileSystem"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(ds, NEWEST_KUBERNETES, strict=True)


def test_kustomize_renders_exactly_the_listed_objects():
    kubectl, kustomize = shutil.which("kubectl"), shutil.which("kustomize")
    if kustomize:
        cmd = [kustomize, "build", str(K8S)]
    elif kubectl:
        cmd = [kubectl, "kustomize", str(K8S)]
    else:
        pytest.skip("neither kustomize nor kubectl is installed")
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, timeout=60).stdout
    rendered = [d for d in yaml.safe_load_all(out) if d]
    key = lambda o: (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"])  # noqa: E731
    assert sorted(map(key, rendered)) == sorted(map(key, kustomized_objects()))
    (ds,) = [o for o in rendered if o["kind"] == "DaemonSet"]
    images = {c["image"] for c in all_containers(ds["spec"]["template"]["spec"])}
    assert images == {f"nodemesh:{kustomization()['images'][0]['newTag']}"}


def test_image_tag_is_the_project_version():
    version = re.search(r'^version\s*=\s*"([^"]+)"', (ROOT / "pyproject.toml").read_text(),
                        re.M).group(1)
    assert kustomization()["images"] == [{"name": "nodemesh", "newTag": version}]
    for spec in (pod_spec(), cleanup_job()["spec"]["template"]["spec"]):
        assert {c["image"] for c in all_containers(spec)} == {f"nodemesh:{version}"}


def test_clusterrole_grants_only_read_on_what_the_source_watches():
    rules = the("ClusterRole")["rules"]
    granted = set()
    for rule in rules:
        assert set(rule) <= {"apiGroups", "resources", "verbs"}, \
            f"unexpected rule fields (resourceNames, nonResourceURLs ...): {rule}"
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                for verb in rule["verbs"]:
                    granted.add((group, resource, verb))
    expected = {(g, r, v) for g, r in [("", "services"), ("", "nodes"), ("", "pods"),
                                       ("discovery.k8s.io", "endpointslices"),
                                       ("nodemesh.io", "meshpolicies")]
                for v in ("get", "list", "watch")}
    assert granted == expected


def test_clusterrolebinding_gives_the_role_to_the_agents_serviceaccount():
    binding, role, account = the("ClusterRoleBinding"), the("ClusterRole"), the("ServiceAccount")
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": account["metadata"]["name"],
                                    "namespace": account["metadata"]["namespace"]}]
    assert pod_spec()["serviceAccountName"] == account["metadata"]["name"]


def test_namespaced_objects_live_in_the_nodemesh_namespace_which_admits_privileged_pods():
    namespace = the("Namespace")
    assert namespace["metadata"]["name"] == "nodemesh"
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "privileged"
    for obj in kustomized_objects() + [cleanup_job()]:
        if obj["kind"] not in ("Namespace", "ClusterRole", "ClusterRoleBinding",
                               "CustomResourceDefinition"):  # cluster-scoped
            assert obj["metadata"]["namespace"] == "nodemesh", obj["metadata"]["name"]


def test_daemonset_runs_on_every_node_in_the_host_network_with_node_critical_priority():
    spec = pod_spec()
    assert spec["hostNetwork"] is True
    assert spec["priorityClassName"] == "system-node-critical"
    # A toleration with operator Exists and neither key nor effect tolerates every taint.
    assert {"operator": "Exists"} in spec["tolerations"]


def test_rolling_update_replaces_one_node_at_a_time_and_never_runs_two_agents_on_a_node():
    ds = the("DaemonSet")
    strategy = ds["spec"]["updateStrategy"]
    assert strategy["type"] == "RollingUpdate"
    assert strategy["rollingUpdate"]["maxUnavailable"] == 1
    assert strategy["rollingUpdate"].get("maxSurge", 0) in (0, "0%")
    labels = ds["spec"]["template"]["metadata"]["labels"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= labels.items()


def test_agent_runs_the_kubernetes_source_with_metrics_on_the_pod_ip_only_port_9464():
    # Loopback is the agent's default; the DaemonSet opts into the pod IP, never 0.0.0.0.
    agent = agent_container()
    assert agent["args"] == ["run", "--source", "kubernetes", "--metrics-addr", "$(POD_IP):9464"]
    env = {e["name"]: e for e in agent["env"]}
    assert env["POD_IP"]["valueFrom"] == {"fieldRef": {"apiVersion": "v1",
                                                       "fieldPath": "status.podIP"}}
    assert metrics_addr_port(agent) == METRICS_PORT
    assert {"name": "metrics", "containerPort": METRICS_PORT, "protocol": "TCP"} in agent["ports"]


def test_liveness_uses_healthz_and_readiness_uses_readyz_on_the_metrics_port():
    agent = agent_container()
    port = metrics_addr_port(agent)
    assert agent["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": port}
    assert agent["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": port}
    # The start-up compile must not count against liveness; it only asks "alive?" too.
    assert agent["startupProbe"]["httpGet"] == {"path": "/healthz", "port": port}


def test_prometheus_scrape_annotations_point_at_the_metrics_port():
    annotations = the("DaemonSet")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == str(metrics_addr_port(agent_container()))
    assert annotations["prometheus.io/path"] == "/metrics"


def test_node_name_comes_from_the_downward_api():
    env = {e["name"]: e for e in agent_container()["env"]}
    assert env["NODEMESH_NODE_NAME"]["valueFrom"] == {
        "fieldRef": {"apiVersion": "v1", "fieldPath": "spec.nodeName"}}


def parse_nodemesh_args(argv, env, monkeypatch):
    """What `nodemesh` makes of these arguments in this environment (options read
    NODEMESH_<NAME> when the parser is built)."""
    from nodemesh.cli import build_parser
    for key in [k for k in os.environ if k.startswith("NODEMESH_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    return build_parser().parse_args(argv)


def test_agent_takes_every_configmap_setting_its_args_and_the_node_name(monkeypatch):
    data = the("ConfigMap")["data"]
    agent = agent_container()
    argv = [a.replace("$(POD_IP)", "10.0.0.7") for a in agent["args"]]  # as the kubelet does
    args = parse_nodemesh_args(argv, {**data, "NODEMESH_NODE_NAME": "worker-1"}, monkeypatch)
    for key, value in data.items():
        option = key[len("NODEMESH_"):].lower()
        assert hasattr(args, option), f"{key}: `nodemesh run` has no --{option.replace('_', '-')}"
        assert str(getattr(args, option)) == value, f"{key} is not read from the environment"
    assert (args.command, args.source, args.metrics_addr, args.node_name) == \
        ("run", "kubernetes", f"10.0.0.7:{METRICS_PORT}", "worker-1")


def test_configmap_holds_neither_node_specific_nor_port_bound_settings():
    data = the("ConfigMap")["data"]
    assert "NODEMESH_NODE_NAME" not in data
    assert "NODEMESH_METRICS_ADDR" not in data  # the probes and annotations name the port
    configmap_name = the("ConfigMap")["metadata"]["name"]
    for spec in (pod_spec(), cleanup_job()["spec"]["template"]["spec"]):
        refs = [e["configMapRef"]["name"] for c in spec["containers"] for e in c.get("envFrom", [])]
        assert refs == [configmap_name]


def test_configmap_paths_are_where_the_host_mounts_are():
    data = the("ConfigMap")["data"]
    mounts = host_mounts(pod_spec(), agent_container())
    assert data["NODEMESH_CGROUP"] == mounts["/sys/fs/cgroup"]["mountPath"]
    assert data["NODEMESH_BPFFS"].startswith(mounts["/sys/fs/bpf"]["mountPath"] + "/")
    assert str(Path(data["NODEMESH_ADMIN_SOCKET"]).parent) == mounts["/run/nodemesh"]["mountPath"]


def test_bpffs_is_shared_with_the_host_so_pins_outlive_the_pod():
    spec = pod_spec()
    volumes = {v["name"]: v for v in spec["volumes"]}
    (bpf_volume,) = [n for n, v in volumes.items() if v.get("hostPath", {}).get("path") == "/sys/fs/bpf"]
    propagation = {c["name"]: m.get("mountPropagation") for c in all_containers(spec)
                   for m in c.get("volumeMounts", []) if m["name"] == bpf_volume}
    # Something mounts bpffs on the host when it is missing: that needs Bidirectional.
    assert "Bidirectional" in propagation.values()
    # The agent sees that mount (and its own pins) on the host's bpffs.
    assert propagation["agent"] in ("HostToContainer", "Bidirectional")
    (bpf_mount,) = [m for m in agent_container()["volumeMounts"] if m["name"] == bpf_volume]
    assert bpf_mount["mountPath"] == "/sys/fs/bpf" and not bpf_mount.get("readOnly")


@pytest.mark.parametrize("kind", ["DaemonSet", "Job"])
def test_bidirectional_propagation_only_in_privileged_containers(kind):
    # The API server refuses Bidirectional in an unprivileged container; the schema can't say.
    objects = kustomized_objects() + [cleanup_job()]
    for container in all_containers(pod_spec(kind, objects)):
        for mount in container.get("volumeMounts", []):
            if mount.get("mountPropagation") == "Bidirectional":
                assert container.get("securityContext", {}).get("privileged") is True, \
                    f"{container['name']} mounts {mount['mountPath']} Bidirectional unprivileged"


def test_the_only_privileged_step_mounts_bpffs_and_nothing_else():
    spec = pod_spec()
    privileged = [c for c in all_containers(spec) if c.get("securityContext", {}).get("privileged")]
    assert [c["name"] for c in privileged] == ["mount-bpf-fs"]
    (step,) = privileged
    assert step in spec["initContainers"]
    assert "mount -t bpf bpf /sys/fs/bpf" in " ".join(step["command"])
    assert [m["mountPath"] for m in step["volumeMounts"]] == ["/sys/fs/bpf"]


def test_agent_mounts_the_hosts_cgroup_root_kernel_headers_and_run_nodemesh():
    mounts = host_mounts(pod_spec(), agent_container())
    assert set(mounts) == {"/sys/fs/bpf", "/sys/fs/cgroup", "/lib/modules", "/usr/src", "/run/nodemesh"}
    # BCC compiles against /lib/modules/$(uname -r)/build, a link into /usr/src: same paths.
    for path in ("/lib/modules", "/usr/src"):
        assert mounts[path]["mountPath"] == path and mounts[path]["readOnly"] is True
    # Not the container's own /sys/fs/cgroup, which under a cgroup namespace is the pod's.
    assert mounts["/sys/fs/cgroup"]["mountPath"] != "/sys/fs/cgroup"
    assert mounts["/run/nodemesh"]["mountPath"] == "/run/nodemesh"
    assert not mounts["/run/nodemesh"].get("readOnly")


@pytest.mark.parametrize("kind", ["DaemonSet", "Job"])
def test_every_volume_mount_names_a_declared_volume_and_every_volume_is_used(kind):
    spec = pod_spec(kind, kustomized_objects() + [cleanup_job()])
    declared = {v["name"] for v in spec["volumes"]}
    used = {m["name"] for c in all_containers(spec) for m in c.get("volumeMounts", [])}
    assert used == declared


def test_agent_drops_all_capabilities_and_adds_only_what_the_datapath_needs():
    security = agent_container()["securityContext"]
    assert security["privileged"] is False
    assert security["capabilities"]["drop"] == ["ALL"]
    assert set(security["capabilities"]["add"]) == AGENT_CAPABILITIES


def test_each_added_capability_says_why():
    lines = (K8S / "daemonset.yaml").read_text().splitlines()
    for capability in AGENT_CAPABILITIES:
        (i,) = [n for n, line in enumerate(lines) if line.strip() == f"- {capability}"]
        assert lines[i - 1].strip().startswith("#"), f"no comment above capability {capability}"


def test_agent_requests_cpu_and_memory_and_is_memory_limited():
    resources = agent_container()["resources"]
    assert set(resources["requests"]) == {"cpu", "memory"}
    assert "memory" in resources["limits"]


def test_no_prestop_hook_removes_the_datapath_on_pod_replacement():
    for container in all_containers(pod_spec()):
        assert "preStop" not in container.get("lifecycle", {})


def test_cleanup_job_runs_nodemesh_cleanup_with_the_agents_mounts_and_privileges():
    spec = cleanup_job()["spec"]["template"]["spec"]
    (container,) = spec["containers"]
    assert container["args"] == ["cleanup"]
    assert spec["hostNetwork"] is True
    assert {"operator": "Exists"} in spec["tolerations"]
    job_mounts = {host: m["mountPath"] for host, m in host_mounts(spec, container).items()}
    agent_mounts = {host: m["mountPath"] for host, m in host_mounts(pod_spec(), agent_container()).items()}
    assert job_mounts == agent_mounts
    assert container["securityContext"]["capabilities"] == agent_container()["securityContext"]["capabilities"]


def test_cleanup_job_cleans_the_bpffs_folder_the_agent_pins_to(monkeypatch):
    data = the("ConfigMap")["data"]
    (container,) = cleanup_job()["spec"]["template"]["spec"]["containers"]
    args = parse_nodemesh_args(container["args"], data, monkeypatch)
    assert args.command == "cleanup"
    assert args.bpffs == data["NODEMESH_BPFFS"]


def test_cleanup_job_is_refused_until_its_node_name_is_filled_in():
    text = (K8S / "cleanup-job.yaml").read_text()
    (job,) = [d for d in yaml.safe_load_all(text) if d]
    assert job["spec"]["template"]["spec"]["nodeName"] == "NODE_NAME"
    assert not DNS1123_SUBDOMAIN.match(job["metadata"]["name"])
    (filled,) = [d for d in yaml.safe_load_all(text.replace("NODE_NAME", "worker-1.example")) if d]
    assert filled["spec"]["template"]["spec"]["nodeName"] == "worker-1.example"
    assert DNS1123_SUBDOMAIN.match(filled["metadata"]["name"])
    kubernetes_validate.validate(filled, NEWEST_KUBERNETES, strict=True)


def _crd_schema():
    (crd,) = load_file("meshpolicy-crd.yaml")
    (version,) = crd["spec"]["versions"]
    return crd, version["schema"]["openAPIV3Schema"]


EXAMPLE_POLICY = {"apiVersion": "nodemesh.io/v1alpha1", "kind": "MeshPolicy",
                  "metadata": {"name": "frontend-only", "namespace": "shop"},
                  "spec": {"action": "ALLOW", "service": "web", "ports": [80],
                           "from": [{"serviceAccounts": ["frontend"],
                                     "labels": {"app": "web"}}]}}


def test_the_meshpolicy_crd_matches_what_the_agent_watches():
    from nodemesh.sources.kubernetes_mesh import GROUP, PLURAL, VERSION

    crd, _ = _crd_schema()
    assert crd["metadata"]["name"] == f"{PLURAL}.{GROUP}"
    assert crd["spec"]["names"]["plural"] == PLURAL and crd["spec"]["scope"] == "Namespaced"
    assert [v["name"] for v in crd["spec"]["versions"]] == [VERSION]


def test_the_crd_schema_and_the_agent_accept_the_same_policy_and_refuse_a_bad_one():
    import jsonschema

    from nodemesh.sources.kubernetes_mesh import mesh_policy

    _, schema = _crd_schema()
    jsonschema.validate(EXAMPLE_POLICY, schema)
    policy, problems = mesh_policy(EXAMPLE_POLICY)
    assert problems == [] and policy.action == "ALLOW" and policy.ports == (80,)
    bad = dict(EXAMPLE_POLICY, spec=dict(EXAMPLE_POLICY["spec"], action="PERMIT"))
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, schema)
    policy, problems = mesh_policy(bad)
    assert policy is None and "spec.action: 'PERMIT' is not an action" in problems[0]
