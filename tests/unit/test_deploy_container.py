"""deploy/Dockerfile, validated statically: no container engine runs here and no
container registry is reachable (so not even buildah or podman can pull
debian:bookworm-slim). The instructions are parsed and checked for what the image must
be, the build context is computed from .dockerignore the way Docker does, and the build
stage's wheel build is run on that context."""
import json
import re
import shlex
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import List

import pytest

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "deploy" / "Dockerfile"
VENV = "/opt/nodemesh/venv"


@dataclass
class Instruction:
    keyword: str
    args: str

    def flags_and_words(self):
        """(--flag=value options, the remaining words) of a shell-form instruction."""
        words = shlex.split(self.args)
        flags = {w.split("=", 1)[0]: w.split("=", 1)[1] if "=" in w else "" for w in words
                 if w.startswith("--")}
        return flags, [w for w in words if not w.startswith("--")]

    def exec_form(self):
        value = json.loads(self.args)
        assert isinstance(value, list), f"{self.keyword} is not in exec (JSON) form"
        return value


def parse_dockerfile(text) -> List[List[Instruction]]:
    """Stages, each a list of instructions; continuation lines joined, comments dropped."""
    stages: List[List[Instruction]] = []
    logical = ""
    for line in text.splitlines():
        stripped = line.strip()
        if stripped.startswith("#") or (not stripped and logical):
            continue  # comments and blank lines may sit inside a continued instruction
        if stripped.endswith("\\"):
            logical += stripped[:-1] + " "
            continue
        logical += stripped
        if logical.strip():
            keyword, _, args = logical.strip().partition(" ")
            instruction = Instruction(keyword.upper(), " ".join(args.split()))
            if instruction.keyword == "FROM":
                stages.append([])
            assert stages, f"{instruction.keyword} before FROM"
            stages[-1].append(instruction)
        logical = ""
    return stages


def stages():
    return parse_dockerfile(DOCKERFILE.read_text())


def build_stage():
    return stages()[0]


def final_stage():
    return stages()[-1]


def runs(stage):
    return [i.args for i in stage if i.keyword == "RUN"]


def apt_installed(stage):
    packages = []
    for command in runs(stage):
        for part in re.split(r"&&|;", command):
            words = part.split()
            if "apt-get" in words and "install" in words:
                packages += [w for w in words[words.index("install") + 1:] if not w.startswith("-")]
    return packages


def test_two_stages_both_on_debian_bookworm_slim():
    froms = [s[0].args.split() for s in stages()]
    assert len(froms) == 2
    assert froms[0] == ["debian:bookworm-slim", "AS", "build"]
    assert froms[1] == ["debian:bookworm-slim"]


def test_wheel_is_built_and_installed_by_an_unprivileged_user():
    user = "root"
    for instruction in build_stage():
        if instruction.keyword == "USER":
            user = instruction.args.split(":")[0]
        if instruction.keyword == "RUN" and "pip install" in instruction.args:
            assert user not in ("root", "0"), "pip runs as root in the build stage"
            # ... and the user is one the stage creates.
            assert any(re.search(rf"\buseradd\b[^&]*\s{re.escape(user)}(\s|$)", r)
                       for r in runs(build_stage())), f"no useradd creates {user}"
            break
    else:
        raise AssertionError("the build stage installs nothing with pip")


def test_venv_uses_debians_python_and_sees_its_bcc():
    (command,) = [r for r in runs(build_stage()) if "-m venv" in r]
    assert f"/usr/bin/python3 -m venv --system-site-packages {VENV}" in command
    # --source kubernetes (the image's CMD) needs the kubernetes client.
    assert f'{VENV}/bin/pip install --no-cache-dir ".[kubernetes]"' in command


def test_final_image_has_bcc_iproute2_bpftool_and_no_compiler_or_headers():
    packages = apt_installed(final_stage())
    assert {"python3-bpfcc", "iproute2", "bpftool"} <= set(packages)
    forbidden = re.compile(r"^(gcc|g\+\+|cpp|clang(-\d+)?|llvm(-\d+)?|make|build-essential|"
                           r"linux-headers-.*|.*-dev|python3-pip)$")
    assert not [p for p in packages if forbidden.match(p)]
    for stage in stages():
        for command in runs(stage):
            if "apt-get install" in command:
                assert "--no-install-recommends" in command
                # Lists removed in the same layer, or they stay in the image.
                assert "rm -rf /var/lib/apt/lists/*" in command


def test_final_image_gets_the_venv_from_the_build_stage_and_bpf_sources_in_usr_share():
    copies = [i.flags_and_words() for i in final_stage() if i.keyword == "COPY"]
    assert ({"--from": "build", "--chown": "root:root"}, [VENV, VENV]) in copies
    # The loader's fallback after NODEMESH_BPF_DIR and a source checkout.
    assert ({}, ["bpf/", "/usr/share/nodemesh/bpf/"]) in copies
    env = " ".join(i.args for i in final_stage() if i.keyword == "ENV")
    assert f"PATH={VENV}/bin:$PATH" in env.split()
    assert "NODEMESH_BPF_DIR=/usr/share/nodemesh/bpf" in env.split()


def test_entrypoint_is_nodemesh_and_the_default_command_runs_the_kubernetes_source():
    (entrypoint,) = [i for i in final_stage() if i.keyword == "ENTRYPOINT"]
    (cmd,) = [i for i in final_stage() if i.keyword == "CMD"]
    assert entrypoint.exec_form() == ["nodemesh"]
    assert cmd.exec_form() == ["run", "--source", "kubernetes"]


def test_final_image_runs_as_root_which_alone_gets_added_capabilities():
    assert [i.args for i in final_stage() if i.keyword == "USER"] in ([], ["root"], ["0"])


def test_parser_reads_continued_instructions_and_skips_comments():
    parsed = parse_dockerfile("FROM a AS b\n# note\nRUN x \\\n  # inside\n  && y\nCMD [\"z\"]\n")
    assert [(i.keyword, i.args) for i in parsed[0]] == [
        ("FROM", "a AS b"), ("RUN", "x && y"), ("CMD", '["z"]')]


# --- the build context ------------------------------------------------------------------

def dockerignore_patterns():
    patterns = []
    for line in (ROOT / ".dockerignore").read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            negate = line.startswith("!")
            patterns.append((negate, line.lstrip("!").strip("/")))
    return patterns


def glob_regex(pattern):
    """Docker's .dockerignore globs: * and ? stay inside one path element, ** spans any."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "*":
            out, i = out + "[^/]*", i + 1
        elif pattern[i] == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(pattern[i]), i + 1
    return re.compile(out + "$")


def excluded(relpath, patterns):
    """Docker's rule: the last pattern matching the path or one of its parents decides."""
    parts = relpath.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    result = False
    for negate, pattern in patterns:
        regex = glob_regex(pattern)
        if any(regex.match(c) for c in candidates):
            result = not negate
    return result


def build_context():
    """Files Docker would send for `docker build -f deploy/Dockerfile .` (relative paths)."""
    patterns = dockerignore_patterns()
    files = []
    for path in sorted(ROOT.rglob("*")):
        rel = path.relative_to(ROOT).as_posix()
        if rel.split("/")[0] in (".git", ".venv") or not path.is_file():
            continue
        if not excluded(rel, patterns):
            files.append(rel)
    return files


def test_build_context_holds_the_package_and_bpf_sources_only():
    context = build_context()
    assert "pyproject.toml" in context
    assert "agent/nodemesh/__init__.py" in context and "agent/nodemesh/cli.py" in context
    assert sorted(f for f in context if f.startswith("bpf/")) == \
        sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "bpf").rglob("*")
               if p.is_file())  # bpf/lib/ too
    allowed = re.compile(r"^(pyproject\.toml|README\.md|agent/.*|bpf/.*)$")
    assert [f for f in context if not allowed.match(f)] == []
    assert not [f for f in context if "__pycache__" in f or f.endswith(".pyc")]
    patterns = dockerignore_patterns()
    assert excluded(".venv/bin/python", patterns) and excluded(".git/HEAD", patterns)
    assert excluded("tests/unit/test_deploy_container.py", patterns)


def test_every_copy_source_is_in_the_build_context():
    context = build_context()
    for stage in stages():
        for instruction in stage:
            if instruction.keyword != "COPY":
                continue
            flags, words = instruction.flags_and_words()
            if "--from" in flags:
                continue
            for source in words[:-1]:
                if source == ".":
                    continue
                prefix = source.rstrip("/")
                assert [f for f in context if f == prefix or f.startswith(prefix + "/")], \
                    f"COPY {source}: nothing of it is in the build context"


@pytest.mark.slow
def test_build_stage_builds_the_wheel_from_the_build_context(tmp_path):
    # What `pip install ".[kubernetes]"` does first, offline: the build backend is the one
    # in this venv instead of a freshly downloaded one.
    context = tmp_path / "context"
    for rel in build_context():
        (context / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, context / rel)
    result = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-index",
                             "--no-build-isolation", "-q", "-w", str(tmp_path / "wheels"),
                             str(context)], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (wheel,) = (tmp_path / "wheels").glob("nodemesh-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        (entry_points,) = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
        assert "nodemesh = nodemesh.cli:main" in z.read(entry_points).decode()
    assert "nodemesh/cli.py" in names and "nodemesh/datapath/loader.py" in names
