# Rescues `import botocore` (through aiobotocore's S3 client): botocore loads its service models and endpoint
# data as files. This replaces pyinstaller-hooks-contrib's hook-botocore, which bundles all of botocore/data
# (~27 MB, 400+ services), with what an S3 client needs.
from PyInstaller.utils.hooks import collect_data_files

# botocore parses HTML error pages from some endpoints with html.parser, imported lazily.
hiddenimports = ["html.parser"]

_KEEP_DIRS = ("botocore/data/s3/",)
_KEEP_FILES = {
    # read when a session or a client is created, whatever the service
    "botocore/data/endpoints.json",
    "botocore/data/partitions.json",
    "botocore/data/sdk-default-configuration.json",
    "botocore/data/_retry.json",
    # the CA bundle botocore falls back to when certifi is not importable
    "botocore/cacert.pem",
}


def _wanted(source: str, dest_dir: str) -> bool:
    name = f"{dest_dir}/{source.rsplit('/', 1)[-1]}"
    return name in _KEEP_FILES or name.startswith(_KEEP_DIRS)


datas = [(source, dest) for source, dest in collect_data_files("botocore") if _wanted(source, dest)]
