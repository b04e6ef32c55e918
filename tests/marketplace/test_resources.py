"""Resource names: one builder and one parser per name, one id rule each."""

from __future__ import annotations

import pytest

from marketplace_server.errors import InvalidArgument
from marketplace_server.resources import (
    account_name,
    data_request_name,
    instance_name,
    parse_account_name,
    parse_data_request_name,
    parse_instance_name,
    parse_permission_name,
    parse_search_name,
    permission_name,
    search_name,
)


def test_each_builder_is_undone_by_its_parser() -> None:
    assert parse_account_name(account_name("acc_1")) == "acc_1"
    assert parse_instance_name(instance_name("box-1.home")) == "box-1.home"
    assert parse_data_request_name(data_request_name("dr-1")) == "dr-1"
    assert parse_search_name(search_name("dr-1", "s_2")) == ("dr-1", "s_2")
    assert parse_permission_name(permission_name("p1")) == "p1"


@pytest.mark.parametrize(
    "name", ["", "accounts/x", "dataRequests/" + "a" * 33, "dataRequests/é", "dataRequests/a\n"]
)
def test_a_parser_refuses_another_shape_and_names_the_field(name: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        parse_data_request_name(name, "data_request")
    assert [v.field for v in caught.value.violations] == ["data_request"]
