"""Errors shared by the offline data builders."""


class MissingSystemPackageError(RuntimeError):
    """A Debian package the data builder shells out to (or reads files from) is not installed."""

    def __init__(self, package: str, what: str):
        self.package = package
        self.install_command = f"apt-get update && apt-get install -y {package}"
        super().__init__(
            f"{what} not found: install the Debian package '{package}' "
            f"(as root: {self.install_command})"
        )
