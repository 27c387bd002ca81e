"""The Ray settings that Serve runs with, from serve/ray.env (see the comments there).

``python -m serve.ray_env`` prints them as `NAME=value` words for `env` (what `make serve` does)."""

from pathlib import Path

RAY_ENV_FILE = Path(__file__).with_name("ray.env")


def read_ray_env(path: Path = RAY_ENV_FILE) -> dict[str, str]:
    """`NAME=value` lines, in file order; blank lines and `#` comments are skipped."""
    settings = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, equals, value = line.partition("=")
        if not equals or not name.strip():
            raise ValueError(f"{path}:{number}: expected NAME=value, got {line!r}")
        settings[name.strip()] = value.strip()
    return settings


if __name__ == "__main__":
    print(" ".join(f"{name}={value}" for name, value in read_ray_env().items()))
