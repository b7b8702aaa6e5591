"""Source conventions of csrc/ that no compiler here enforces."""
import pathlib
import re

CSRC = pathlib.Path(__file__).resolve().parent.parent / "csrc"


def test_checks_build_their_messages_without_ostream_numerics():
    # Raw TORCH_CHECK* stream their message arguments (numbers, sizes()) through std::ostream; on the
    # GPU machine's toolchain that crashed the process instead of raising (csrc/common/check.h).
    # DBSAM_CHECK* format numbers with std::to_string and shapes with shape_str.
    offenders = []
    for path in sorted(CSRC.rglob("*")):
        if path.suffix not in (".h", ".cpp", ".cu", ".cuh") or path.name == "check.h":
            continue
        for no, line in enumerate(path.read_text().splitlines(), 1):
            code = line.split("//", 1)[0]
            if re.search(r"\bTORCH_CHECK\w*\s*\(|\bTORCH_WARN\w*\s*\(|\bAT_ERROR\s*\(", code):
                offenders.append(f"{path.relative_to(CSRC)}:{no}: {line.strip()}")
    assert not offenders, "use DBSAM_CHECK* (csrc/common/check.h):\n" + "\n".join(offenders)
    assert any(CSRC.rglob("*.cu")), "csrc/ not found next to tests/"
