"""Package discovery only (metadata lives in pyproject.toml): every package under
overture/ and under the top-level folders that install inside the overture namespace."""

from setuptools import find_packages, setup

MAPPED = ("pretrain", "finetune", "tasks", "recipes")  # folder -> overture.<folder>

packages = find_packages(include=["overture", "overture.*"])
for folder in MAPPED:
    packages += [f"overture.{folder}"] + [
        f"overture.{folder}.{sub}" for sub in find_packages(folder)]

setup(packages=packages)
