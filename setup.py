"""Install soda-mega: the `soda_mega` library, the Triton kernels (folder `kernels/`, imported
as `soda_kernels` so it cannot clash with the unrelated PyPI package `kernels`) and the
`soda-mega` command.

Use `bash scripts/bootstrap.sh` for a complete environment. `moshi` and `mosaicml-streaming`
are deliberately not in `install_requires`: their published pins (torch<2.10, numpy<2.2,
torchvision, cloud SDKs) would make pip replace the machine's torch. The bootstrap installs
them with `--no-deps` (requirements/nodeps.txt) next to the runtime imports they need.
"""

from pathlib import Path

from setuptools import find_packages, setup

HERE = Path(__file__).parent


def _requirements(name: str) -> list[str]:
    lines = (HERE / "requirements" / name).read_text().splitlines()
    return [ln.split("#")[0].strip() for ln in lines if ln.split("#")[0].strip()]


packages = find_packages(include=["soda_mega", "soda_mega.*"])
packages += ["soda_kernels"] + [
    "soda_kernels." + p for p in find_packages(where="kernels")
]

setup(
    name="soda-mega",
    version="0.1.0",
    description="Megatron-core + Triton training stack for SODA-style audio-text foundation models",
    long_description=(HERE / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=packages,
    package_dir={"soda_kernels": "kernels"},
    package_data={
        "soda_mega.config": ["presets/*.yaml"],
        # the IsoFLOP grids of `soda-mega scaling grid --grid NAME`
        "soda_mega.scaling": ["grids/*.yaml"],
        # the embedded demo corpus (soda-mega data demo): sentences, text corpus, fallback WAVs
        "soda_mega.data.write": ["demo_assets/*.txt", "demo_assets/fallback/*.wav",
                                 "demo_assets/fallback/*.jsonl"],
    },
    include_package_data=True,
    install_requires=["torch>=2.6"] + _requirements("runtime.txt"),
    extras_require={
        "test": _requirements("test.txt"),
        # the static checks of scripts/lint.sh (ruff, mypy), pinned
        "lint": _requirements("lint.txt"),
        # flash-attn ships no wheel on PyPI and builds against the local CUDA toolkit.
        "flash": ["flash-attn>=2.6"],
    },
    entry_points={"console_scripts": ["soda-mega=soda_mega.cli:console_main"]},
)
