"""Property-based requests from the API's own OpenAPI document: no input yields a 5xx, and every
response matches the documented schema (schemathesis, a bounded number of examples)."""

import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.specs.openapi.checks import positive_data_acceptance

from tests.factories import ADMIN_KEY, AUTH

EXAMPLES_PER_OPERATION = 25
# Requests valid by the schema that the API refuses on purpose with a 400 saying why: a prompt
# longer than the model's context, a timeout above the server's limit, 5.0 for an integer.
REFUSED_BY_DESIGN = [positive_data_acceptance]
# Both ways of sending a key, so that neither is left to a generated (invalid) value; the
# `ignored_auth` check still sends requests without them, and with wrong ones, expecting 401.
ADMIN_HEADERS = AUTH | {"X-API-Key": ADMIN_KEY}


def test_api_conforms_to_its_schema(api_server):
    schema = schemathesis.openapi.from_url(f"{api_server}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    for operation in operations:

        @given(case=operation.as_strategy())
        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        def conforms(case):
            case.call_and_validate(
                headers=ADMIN_HEADERS, timeout=60, excluded_checks=REFUSED_BY_DESIGN
            )

        conforms()
