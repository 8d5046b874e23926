"""Machine classes (harness/cpu.py): told apart by vendor, family, model and ISA."""

from harness.host import machine_class


def test_classes_are_told_apart_by_vendor_family_model_and_isa():
    zen3 = {"architecture": "x86_64", "vendor": "amd", "family": 25, "model_number": 1,
            "isa_flags": ["avx", "avx2", "fma"]}
    assert machine_class.same_class(zen3, dict(zen3))
    assert not machine_class.same_class(zen3, {**zen3, "model_number": 17})
    assert not machine_class.same_class(zen3, {**zen3, "vendor": "intel"})
    assert not machine_class.same_class(zen3, {**zen3,
                                               "isa_flags": ["avx", "avx2", "avx512f", "fma"]})
    # An older lock knows neither family nor model number: the rest decides.
    assert machine_class.same_class(zen3, {**zen3, "family": None, "model_number": None})
    older = machine_class.cpu_class({"model": "AMD EPYC", "architecture": "x86_64",
                               "isa_flags": ["fma", "avx2", "avx"]})
    assert older["vendor"] == "amd" and machine_class.same_class(older, zen3)
    assert machine_class.class_id(zen3) == "amd-f25-m1-avx2"
