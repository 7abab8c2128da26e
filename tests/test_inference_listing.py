"""ListModels stays under the client's 4 MiB message limit whatever is published: adapters come in
pages (bounded in count and bytes), every page carries the base models, and malformed page fields
are INVALID_ARGUMENT. The plane here is a test double that reports a listing a real registry could
hold (thousands of versions, long failure reasons); publishing that many real adapters would only
slow the test down."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from lorafleet.v1 import inference_pb2 as pb
from services.inference.client import collect_model_pages
from services.inference.errors import InvalidRequestError
from services.inference.plane import BaseModelInfo, HostedAdapterStatus
from services.inference.registry import AdapterStatus
from services.inference.server import LIST_PAGE_BYTES, LIST_PAGE_DEFAULT, list_models_to_pb

CLIENT_LIMIT = 4 * 1024 * 1024


@dataclass
class ListingPlane:
    """Just what ``list_models_to_pb`` asks of a plane: the base models and every adapter version."""

    adapters: list[HostedAdapterStatus]

    def list_models(self) -> tuple[list[BaseModelInfo], list[HostedAdapterStatus]]:
        base = BaseModelInfo("tiny", "/models/tiny", "fp32", "none", "ready", "", "chatml", 2048)
        return [base], self.adapters


def _adapters(count: int, reason_chars: int = 0) -> list[HostedAdapterStatus]:
    out = []
    for i in range(count):
        name, version = f"a{i // 10:05d}", i % 10 + 1
        status = AdapterStatus(
            name,
            version,
            f"{name}@{version}",
            "/models/tiny",
            "failed" if reason_chars else "available",
            "x" * reason_chars,
            8,
            "chatml",
            "lora",
        )
        out.append(HostedAdapterStatus("tiny", status))
    return out


def _pages(plane: ListingPlane, page_size: int = 0) -> list[pb.ListModelsResponse]:
    pages, token = [], ""
    while True:
        page = list_models_to_pb(plane, page_size, token)  # type: ignore[arg-type]
        pages.append(page)
        token = page.next_page_token
        if not token:
            return pages


def test_a_small_listing_is_one_page() -> None:
    pages = _pages(ListingPlane(_adapters(12)))
    assert len(pages) == 1 and len(pages[0].adapters) == 12 and not pages[0].next_page_token
    assert [m.name for m in pages[0].models] == ["tiny"]


def test_many_versions_come_in_pages_of_the_asked_size_in_order() -> None:
    plane = ListingPlane(_adapters(1234))
    pages = _pages(plane)
    assert [len(p.adapters) for p in pages] == [LIST_PAGE_DEFAULT, LIST_PAGE_DEFAULT, 234]
    assert all([m.name for m in p.models] == ["tiny"] for p in pages)
    refs = [a.ref for p in pages for a in p.adapters]
    assert refs == [h.status.ref for h in plane.adapters]
    assert [len(p.adapters) for p in _pages(plane, page_size=1000)] == [1000, 234]


def test_pages_stay_under_the_client_limit_whatever_is_stored() -> None:
    plane = ListingPlane(_adapters(400, reason_chars=20_000))  # 8 MB of failure reasons
    pages = _pages(plane, page_size=1000)
    assert len(pages) > 2
    assert all(p.ByteSize() <= LIST_PAGE_BYTES + 64 * 1024 < CLIENT_LIMIT for p in pages)
    assert sum(len(p.adapters) for p in pages) == 400
    merged = collect_model_pages(lambda request: list_models_to_pb(plane, 1000, request.page_token))  # type: ignore[arg-type]
    assert len(merged.adapters) == 400 and [m.name for m in merged.models] == ["tiny"]


@pytest.mark.parametrize(
    ("page_size", "page_token", "field"),
    [
        (-1, "", "page_size"),
        (1001, "", "page_size"),
        (0, "abc", "page_token"),
        (0, "9" * 40, "page_token"),
        (0, "-5", "page_token"),
        (0, "１２", "page_token"),
    ],
)
def test_malformed_page_fields_name_the_field(page_size: int, page_token: str, field: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        list_models_to_pb(ListingPlane(_adapters(3)), page_size, page_token)  # type: ignore[arg-type]
    assert [p.field for p in err.value.problems] == [field]
    assert len(err.value.reason) < 300


def test_a_token_past_the_end_is_an_empty_last_page() -> None:
    page = list_models_to_pb(ListingPlane(_adapters(3)), 0, "50")  # type: ignore[arg-type]
    assert list(page.adapters) == [] and not page.next_page_token and len(page.models) == 1
