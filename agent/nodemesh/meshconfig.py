"""The `workloads:` and `policies:` sections of a config file, validated like the services:
every problem names its field path.

    workloads:
      - cgroup: kubepods.slice/web.slice   # relative to the cgroup v2 mount
        name: web-1                        # optional, for `policy check --from NS/NAME`
        namespace: shop
        serviceAccount: frontend           # default "default"
        labels: {app: web}
        socketLB: false                    # optional: connect() to VIPs is not translated
    policies:
      - name: frontend-only
        namespace: shop                    # the policy's and the service's namespace
        action: ALLOW                      # ALLOW | DENY | AUDIT
        service: web
        ports: [80]                        # optional: service ports
        from:                              # optional: any of these; omitted: every caller
          - {namespaces: [shop], serviceAccounts: [frontend], labels: {app: web}}
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

from . import config
from .identity import Workload
from .policy import ACTIONS, Mesh, Policy, PolicySource

WORKLOAD_FIELDS = ("cgroup", "name", "namespace", "serviceAccount", "labels", "socketLB")
POLICY_FIELDS = ("name", "namespace", "action", "service", "ports", "from")
SOURCE_FIELDS = ("namespaces", "serviceAccounts", "labels")
MAX_LABEL = 253


def _labels(c: "config._Checker", raw: Any, path: str) -> Optional[Tuple[Tuple[str, str], ...]]:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        c.fail(path, f"must be a mapping of label to value, not {config._kind(raw)}")
        return None
    out = []
    for k, v in raw.items():
        if not isinstance(k, str) or not isinstance(v, str) or len(k) > MAX_LABEL or \
                len(v) > 63:
            c.fail(f"{path}.{config._key_text(k)}", f"{config._show(v)} is not a label value "
                                                     f"(a string of at most 63 characters)")
            return None
        out.append((k, v))
    return tuple(sorted(out))


def _names(c: "config._Checker", raw: Any, path: str) -> Optional[Tuple[str, ...]]:
    if raw is None:
        return ()
    if not isinstance(raw, list):
        c.fail(path, f"must be a list, not {config._kind(raw)}")
        return None
    got = [c.label(v, f"{path}[{i}]") for i, v in enumerate(raw)]
    return None if None in got else tuple(g for g in got if g is not None)


def _workload(c: "config._Checker", raw: Any, path: str) -> Optional[Workload]:
    obj = c.fields(raw, path, WORKLOAD_FIELDS, "a workload")
    if not isinstance(raw, dict):
        return None
    before = len(c.problems)
    cgroup = obj.get("cgroup")
    if not isinstance(cgroup, str) or not cgroup.strip("/") or ".." in cgroup.split("/"):
        c.fail(f"{path}.cgroup", f"{config._show(cgroup)} is not a cgroup path (relative to "
                                 f"the cgroup v2 mount, without '..')")
    name = obj.get("name", "")
    if not isinstance(name, str):
        c.fail(f"{path}.name", f"{config._show(name)} must be a string")
    ns = c.label(obj.get("namespace", "default"), f"{path}.namespace")
    sa = c.label(obj.get("serviceAccount", "default"), f"{path}.serviceAccount")
    labels = _labels(c, obj.get("labels"), f"{path}.labels")
    lb = obj.get("socketLB", True)
    if not isinstance(lb, bool):
        c.fail(f"{path}.socketLB", f"{config._show(lb)} must be true or false")
    if len(c.problems) > before or ns is None or sa is None or labels is None:
        return None
    return Workload(cgroup.strip("/"), ns, sa, labels, lb, name)


def _policy(c: "config._Checker", raw: Any, path: str) -> Optional[Policy]:
    obj = c.fields(raw, path, POLICY_FIELDS, "a policy")
    if not isinstance(raw, dict):
        return None
    before = len(c.problems)
    for req in ("name", "action", "service"):
        if req not in obj:
            c.fail(f"{path}.{req}", "is required")
    name = c.label(obj["name"], f"{path}.name") if "name" in obj else None
    ns = c.label(obj.get("namespace", "default"), f"{path}.namespace")
    action = obj.get("action")
    if "action" in obj and action not in ACTIONS:
        c.fail(f"{path}.action", f"{config._show(action)} is not an action (one of: "
                                 f"{', '.join(ACTIONS)})")
    service = c.label(obj["service"], f"{path}.service") if "service" in obj else None
    ports: List[int] = []
    raw_ports = obj.get("ports") or []
    if not isinstance(raw_ports, list):
        c.fail(f"{path}.ports", f"must be a list, not {config._kind(raw_ports)}")
    else:
        for i, p in enumerate(raw_ports):
            got = c.integer(p, f"{path}.ports[{i}]", 1, 65535, "a port")
            if got is not None:
                ports.append(got)
    sources: List[PolicySource] = []
    raw_from = obj.get("from") or []
    if not isinstance(raw_from, list):
        c.fail(f"{path}.from", f"must be a list, not {config._kind(raw_from)}")
    else:
        for i, rs in enumerate(raw_from):
            sp = f"{path}.from[{i}]"
            so: Dict[str, Any] = c.fields(rs, sp, SOURCE_FIELDS, "a source")
            nss = _names(c, so.get("namespaces"), f"{sp}.namespaces")
            sas = _names(c, so.get("serviceAccounts"), f"{sp}.serviceAccounts")
            labels = _labels(c, so.get("labels"), f"{sp}.labels")
            if nss is not None and sas is not None and labels is not None:
                sources.append(PolicySource(nss, sas, labels))
    if len(c.problems) > before or None in (name, ns, service):
        return None
    assert name is not None and ns is not None and service is not None
    return Policy(name, ns, str(action), service, tuple(ports), tuple(sources))


def check(c: "config._Checker", top: Dict[str, Any]) -> Mesh:
    """Validate the two sections of a parsed document (problems go to `c`)."""
    workloads: List[Workload] = []
    policies: List[Policy] = []
    for section, fn, out in (("workloads", _workload, workloads),
                             ("policies", _policy, policies)):
        raw = top.get(section) or []
        if not isinstance(raw, list):
            c.fail(section, f"must be a list, not {config._kind(raw)}")
            continue
        for i, item in enumerate(raw):
            got = fn(c, item, f"{section}[{i}]")
            if got is not None:
                out.append(got)  # type: ignore[arg-type]
    seen: Dict[str, int] = {}
    for i, w in enumerate(workloads):
        if w.cgroup in seen:
            c.fail(f"workloads[{i}].cgroup", f"{w.cgroup} is listed twice (also "
                                             f"workloads[{seen[w.cgroup]}])")
        seen[w.cgroup] = i
    return Mesh(tuple(workloads), tuple(policies))


def load(path: str) -> Mesh:
    """The mesh sections of a config file (empty when it has none). Raises ConfigError."""
    text = config.read(path)
    if b"workloads" not in text and b"policies" not in text:
        return Mesh()  # the common case: no second parse of a large services file
    doc = config._document(text)
    if not isinstance(doc, dict):
        return Mesh()
    c = config._Checker()
    mesh = check(c, doc)
    if c.problems:
        raise config.ConfigError(path, c.problems)
    return mesh
