"""Issue 14: no config value ever reaches a shell. The agent's code (everything the `run`,
`check` and `cleanup` commands import) starts programs only with an argv list, never through
a shell: no shell=True, os.system, os.popen, or a command given as one string. The lab (and
the demo, which is a lab) builds shell lines from names it makes itself, never from a
config, and is the one exception."""
import ast
import os

import nodemesh

PACKAGE = os.path.dirname(nodemesh.__file__)
LAB_ONLY = {"lab", "demo.py"}  # test and demo networks: their own names, no config values
SPAWNERS = {"run", "Popen", "call", "check_call", "check_output", "getoutput",
            "getstatusoutput"}


def agent_sources():
    for folder, dirs, files in os.walk(PACKAGE):
        dirs[:] = [d for d in dirs if d not in LAB_ONLY and d != "__pycache__"]
        for name in files:
            if name.endswith(".py") and name not in LAB_ONLY:
                yield os.path.join(folder, name)


def shell_uses(path):
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")
        owner = getattr(func.value, "id", "") if isinstance(func, ast.Attribute) else ""
        where = f"{os.path.relpath(path, PACKAGE)}:{node.lineno}"
        if owner == "os" and (name in ("system", "popen") or name.startswith("exec")):
            yield f"{where}: os.{name}"
        if any(k.arg == "shell" and not (isinstance(k.value, ast.Constant)
                                         and k.value.value is False) for k in node.keywords):
            yield f"{where}: shell="
        if owner == "subprocess" and name in SPAWNERS:
            argv = node.args[0] if node.args else None
            if name in ("getoutput", "getstatusoutput") or isinstance(argv, (ast.Constant,
                                                                              ast.JoinedStr)):
                yield f"{where}: subprocess.{name} with a command string"


def test_the_audit_sees_the_agents_modules():
    names = {os.path.relpath(p, PACKAGE) for p in agent_sources()}
    assert {"config.py", "daemon.py", "datapath/loader.py", "datapath/compile.py",
            "sources/kubernetes.py"} <= names


def test_no_agent_code_starts_a_program_through_a_shell():
    found = [use for path in agent_sources() for use in shell_uses(path)]
    assert found == []


def test_the_audit_catches_each_way_to_a_shell(tmp_path):
    bad = tmp_path / "bad.py"
    bad.write_text("import os, subprocess\nos.system('mount ' + x)\n"
                   "subprocess.run(f'ip link del {name}', shell=True)\n"
                   "subprocess.Popen('ls')\nsubprocess.getoutput(cmd)\nos.popen(cmd)\n")
    assert [u.split(": ", 1)[1] for u in shell_uses(str(bad))] == [
        "os.system", "shell=", "subprocess.run with a command string",
        "subprocess.Popen with a command string", "subprocess.getoutput with a command string",
        "os.popen"]
