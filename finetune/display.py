"""Plain text for what users read: tables (reports, the run plan) and byte sizes."""

from __future__ import annotations


def table(header: list[str], rows: list[list[str]]) -> str:
    """Columns padded to their widest cell; the first column left-aligned, the others right-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    line = "  ".join("-" * w for w in widths)
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    return "\n".join([fmt.format(*header), line, *(fmt.format(*map(str, r)) for r in rows)])


def human(size: int | None) -> str:
    """``1536`` -> ``1.5 KiB``; None -> ``unknown``."""
    if size is None:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"
