"""`make vm-test` (scripts/vm-test) is too slow for `make test`: here, without booting anything,
its parts are checked. The image carries every package scripts/setup installs (the VM is
offline), the VM's Vagrantfile is valid and keeps the VM emulated and isolated, and the
scripts parse."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VM = ROOT / "scripts" / "vm"
VAGRANT = shutil.which("vagrant")


def setup_apt_packages():
    text = (ROOT / "scripts" / "setup").read_text()
    body = re.search(r"^APT_PACKAGES=\((.*?)\)", text, re.S | re.M).group(1)
    return set(re.sub(r"#.*", "", body).split())


def test_the_image_carries_every_package_make_setup_installs():
    listed = subprocess.run([VM / "packages"], capture_output=True, text=True, check=True).stdout.split()
    assert setup_apt_packages() <= set(listed)
    # A kernel with its own headers: BCC compiles against the VM's running kernel.
    assert {"linux-image-amd64", "linux-headers-amd64", "openssh-server", "sudo", "rsync"} <= set(listed)


@pytest.mark.parametrize("script", ["scripts/vm-test", "scripts/vm/build-box", "scripts/vm/packages"])
def test_scripts_parse(script):
    subprocess.run(["bash", "-n", ROOT / script], check=True)


def test_vm_test_is_a_make_target_but_not_part_of_make_test():
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^vm-test:.*\n\tbash scripts/vm-test$", makefile, re.M)
    test_rule = re.search(r"^test:(.*)$", makefile, re.M).group(1)
    assert "vm-test" not in test_rule


def test_the_vm_is_emulated_and_its_network_forwards_nowhere():
    text = (VM / "Vagrantfile").read_text()
    assert 'lv.driver = "qemu"' in text and 'lv.cpu_model = "qemu64"' in text
    assert 'lv.management_network_mode = "none"' in text
    box = (VM / "box.Vagrantfile").read_text()
    assert "lv.kernel" in box and "lv.initrd" in box and "root=/dev/vda" in box


@pytest.mark.slow
@pytest.mark.skipif(VAGRANT is None, reason="vagrant is not installed (Debian package vagrant)")
def test_vagrant_validate_accepts_the_vm_test_vagrantfile(tmp_path):
    env = {**os.environ, "VAGRANT_HOME": str(tmp_path / "home"), "VAGRANT_DOTFILE_PATH": str(tmp_path / "dot"),
           "VAGRANT_CHECKPOINT_DISABLE": "1", "VAGRANT_NO_COLOR": "1", "VAGRANT_CWD": str(VM)}
    key = tmp_path / "key"
    key.write_text("not a key\n")
    settings = {"NODEMESH_VM_BOX": "nodemesh-vmtest-x", "NODEMESH_VM_SSH_KEY": str(key),
                "NODEMESH_VM_SOURCE": str(ROOT), "NODEMESH_VM_WHEELS": str(tmp_path),
                "NODEMESH_VM_CONSOLE_LOG": str(tmp_path / "console.log")}
    plugins = subprocess.run([VAGRANT, "plugin", "list"], env=env, capture_output=True, text=True).stdout
    args = ["validate"] if "vagrant-libvirt" in plugins else ["validate", "--ignore-provider"]
    ok = subprocess.run([VAGRANT, *args], env={**env, **settings}, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    # Run by hand, without scripts/vm-test's settings, it says what is missing.
    bare = subprocess.run([VAGRANT, *args], env=env, capture_output=True, text=True, timeout=120)
    assert bare.returncode != 0 and "NODEMESH_VM_BOX is not set" in bare.stdout + bare.stderr
