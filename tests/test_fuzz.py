"""Fuzzing as part of the suite (benchmarks/fuzz.py, seeded: a failure names the command that reproduces it):
mutated JPEGs through the C crop decoder with guard bytes, in a child process (and under ASan/UBSan where gcc
has libasan); mutated .beton/manifest.json pairs through open_split and every installed backend's constructor
and first batch; mutated JPEG records through every decoder of the photo backend; hostile converter sources
through convert_dataset. Each case must be refused or give a correct result: never another exception, garbage, a
crash or a hang. About 75 s together on 2 busy cores."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from benchmarks.fuzz import Report, fuzz, sanitized_library
from tests.loader_helpers import require_crop_library

MAX_RSS_MIB = 3 * 1024  # no child may come near the memory a bomb would take


def check(report: Report, *, least_ok: int, least_refused: int) -> None:
    """No failure (each with the command that reproduces it), and cases that both pass and are refused: the
    mutations reach past the first check."""
    assert not report.skipped, report.skipped
    failures = "\n".join(f"case {case}: {outcome}: {detail} (reproduce: python -m benchmarks.fuzz --kind "
                         f"{report.kind} --seed {report.seed} --case {case})"
                         for case, outcome, detail in report.failures)
    assert not report.failures, f"{len(report.failures)} of {report.cases} cases failed:\n{failures}"
    assert report.counts["ok"] >= least_ok and report.counts["refused"] >= least_refused, report.counts
    assert report.peak_rss_mib < MAX_RSS_MIB


def test_mutated_jpegs_through_the_crop_decoder(tmp_path: Path) -> None:
    require_crop_library()
    report = fuzz("jpeg", 3000, seed=26, workdir=tmp_path)
    assert report.cases == 3000
    check(report, least_ok=300, least_refused=500)  # 387 ok: a decode with a libjpeg warning is refused (issue 40)


def test_mutated_jpegs_under_address_and_undefined_behaviour_sanitizers(tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    probe.mkdir()
    if sanitized_library(probe, {}) is None:
        pytest.skip("gcc cannot build with -fsanitize=address,undefined here")
    report = fuzz("jpeg", 500, seed=27, workdir=tmp_path, sanitize=True)
    assert report.sanitized
    check(report, least_ok=50, least_refused=50)


def test_mutated_betons_and_manifests_through_open_split_and_every_backend(tmp_path: Path) -> None:
    """Against the reader before its rewrite (a5a6fe0~1), 9 of these 150 cases failed: 2 segfaults, KeyError and
    TypeError on manifests of the wrong shape, and splits opened with classes True, mean None or labels past the
    classes; none fail since."""
    report = fuzz("beton", 150, seed=26, workdir=tmp_path)
    check(report, least_ok=10, least_refused=50)


def test_mutated_records_through_every_photo_decoder(tmp_path: Path) -> None:
    """The photo backend's decoding: JPEG records mutated in a .beton (their entropy-coded data, their headers, their
    stored sizes) through the compiled decoder, Pillow and the device path on the CPU. Each case decodes a whole
    epoch of sound batches or stops with one line naming a mutated record (the frame-header check at open, or the
    decoder's failure); about half the refusals come from the decoders."""
    require_crop_library()  # else the fuzz leaves the compiled decoder out
    report = fuzz("photo", 600, seed=26, workdir=tmp_path)
    assert report.cases == 600
    check(report, least_ok=50, least_refused=300)


def test_hostile_sources_through_the_converter(tmp_path: Path) -> None:
    report = fuzz("convert", 40, seed=26, workdir=tmp_path)
    check(report, least_ok=5, least_refused=10)


def test_the_harness_counts_crashes_and_hangs_and_goes_on(tmp_path: Path) -> None:
    """A decoder that crashes on some inputs and hangs on others: each costs one case, the rest still run (and
    are found wrong: this library's crop_batch refuses every call as if its arguments described no batch)."""
    source = tmp_path / "bad.c"
    source.write_text("#include <stdint.h>\n#include <stdlib.h>\n"
                      "int decode_region(const unsigned char *s, uint64_t n, unsigned char *d, uint64_t c, uint32_t t,"
                      " uint32_t l, uint32_t h, uint32_t w, uint32_t k, double *r) {\n"
                      "  if (n % 13 == 0) abort();\n  if (n % 17 == 0) for (;;) {}\n  return -1;\n}\n"
                      "int resize_area(const unsigned char *s, int32_t r, int32_t c, double a, double b, double x,"
                      " double y, unsigned char *d, int32_t h, int32_t w) { return -1; }\n"
                      "int crop_batch(const unsigned char *b, uint64_t m, const int64_t *o, const int64_t *l,"
                      " const uint8_t *j, const int64_t *z, const int64_t *x, int32_t n, unsigned char *d, int32_t h,"
                      " int32_t w, int32_t *s) { return -1; }\n")
    library = tmp_path / "bad.so"
    if subprocess.run(["gcc", "-shared", "-fPIC", str(source), "-o", str(library)]).returncode != 0:
        pytest.skip("no C compiler")
    report = fuzz("jpeg", 40, seed=1, workdir=tmp_path / "work", library=library, timeout=1)
    assert report.cases == 40
    assert report.counts["crash"] > 0 and report.counts["hang"] > 0 and report.counts["wrong"] > 0
    assert {outcome for _, outcome, _ in report.failures} <= {"crash", "hang", "wrong"}
