"""TOML reading: the standard library's tomllib (Python >= 3.11) or tomli, its backport, on 3.10."""

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

loads = tomllib.loads
TOMLDecodeError = tomllib.TOMLDecodeError
