"""One rule for credentials in URLs: what settings refuse is what `redact` hides, and nothing else changes."""

from __future__ import annotations

import pytest

from components.core.credentials import credential_problem, redact


@pytest.mark.parametrize(
    ("location", "shown"),
    [
        # user:password@ says credentials are in use, not which; host, port and path as given
        ("https://ci%40corp:p%2Fss@MLflow.Example.com:8443/base", "https://***@MLflow.Example.com:8443/base"),
        ("http://alice:secret@[::1]:5000/api", "http://***@[::1]:5000/api"),
        # a secret's value goes, its name and every other parameter stay exactly as written
        ("https://u:p@host/x?sig=abc&v=1", "https://***@host/x?sig=***&v=1"),
        ("s3://b/k?X-Amz-Signature=abc&name=a%26b&flag#top", "s3://b/k?X-Amz-Signature=***&name=a%26b&flag#top"),
        ("https://h/x?%73ig=abc", "https://h/x?%73ig=***"),  # an encoded key is still the key
    ],
)
def test_redact_hides_exactly_the_credentials_settings_refuse(location, shown):
    assert credential_problem(location) is not None
    assert redact(location) == shown


@pytest.mark.parametrize(
    "location", ["sqlite:////tmp/mlflow.db", "data/raw images", "https://host/x?v=1&q=a%20b", "gs://bucket/set/"]
)
def test_redact_leaves_what_holds_no_credential_as_it_is(location):
    assert credential_problem(location) is None
    assert redact(location) == location
