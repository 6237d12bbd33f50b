"""Maps the stage library in stages/ to the vlflow.stages namespace (pyproject holds everything else)."""
from setuptools import find_packages, setup

engine = ["vlflow"] + [f"vlflow.{p}" for p in find_packages("vlflow")]
stage_library = ["vlflow.stages"] + [f"vlflow.stages.{p}" for p in find_packages("stages")]

setup(
    packages=engine + stage_library,
    package_dir={"vlflow": "vlflow", "vlflow.stages": "stages"},
    package_data={"vlflow.stages": ["**/*.json", "**/*.txt"]},
)
