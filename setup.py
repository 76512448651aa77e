"""The one build step pyproject.toml cannot say: copy the Knative manifests and the function
sources into the package, so an installed bucketml runs `bucketml dev` and `bucketml deploy`
from any folder.

infra/knative (the kustomize base and the Triggers the local broker routes by), infra/overlays,
infra/variants and functions/ stay where they are in the source tree, the one source of truth;
the wheel carries copies of them under bucketml/_bundled/ with the same relative layout (the
overlays' `../../knative` still resolves). `bucketml.settings.resource_path` prefers the
source tree when it runs from a checkout, so an editable install (`pip install -e .`) bundles
nothing and uses the files in place. A build whose source lacks these folders (the container
images copy only pyproject.toml and shared/) bundles what there is, which may be nothing.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
BUNDLED = ("infra/knative", "infra/overlays", "infra/variants", "functions")
TARGET = Path("bucketml") / "_bundled"


class build_py_with_resources(build_py):
    def run(self) -> None:
        editable = getattr(self, "editable_mode", False)
        if not editable:
            # The build folder outlives a build: start from an empty one, so a module or a
            # manifest removed from the source is not shipped again from an earlier build.
            shutil.rmtree(Path(self.build_lib) / "bucketml", ignore_errors=True)
        super().run()
        if editable:
            return
        target = Path(self.build_lib) / TARGET
        for relative in BUNDLED:
            source = ROOT / relative
            if source.is_dir():
                shutil.copytree(source, target / relative, ignore=shutil.ignore_patterns("__pycache__", "*.py[co]"))


setup(cmdclass={"build_py": build_py_with_resources})
