"""One-shot object-store set-up (compose `store-init`, Kubernetes Job `store-init`): buckets, one user and
one policy per role, a fresh key per role written to that role's credentials file, and a check that every
policy is attached and enforced. Exits non-zero (and writes no credentials file for the role) otherwise.

Roles (policies in infra/s3/policies/, `${DVC_BUCKET}` / `${MLFLOW_BUCKET}` substituted):
  training  workers: read/write on the data (DVC) and model (MLflow) buckets
  mlflow    the MLflow server: read/write on the model bucket only
  serving   model servers: read-only on the model bucket

Admin APIs (S3_ADMIN_API):
  minio     MinIO's admin API (the `minio` package's MinioAdmin); admin = MINIO_ROOT_USER/PASSWORD
  iam       the AWS IAM API (AWS itself, or moto's server in `make e2e-docker`); admin = S3_ADMIN_ACCESS_KEY/
            S3_ADMIN_SECRET_KEY, or with S3_BOOTSTRAP_ADMIN=1 (moto only) an admin user created in the store's
            initial unauthenticated window, after which the store must refuse unsigned requests.

Keys are generated here and written to S3_CREDENTIALS_DIR/<role>/credentials (AWS shared-credentials
format, mode 0600), which each service mounts read-only as AWS_SHARED_CREDENTIALS_FILE: no object-store
key is in infra/.env, an environment variable or a command line. Secrets are never printed.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

POLICY_DIR = Path(os.environ.get("S3_POLICY_DIR", Path(__file__).resolve().parent / "policies"))
ROLES = ("training", "mlflow", "serving")
USER_PREFIX = "tp-"
DENIED = {"AccessDenied", "AccessDeniedException", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden", "403"}


class SetupError(RuntimeError):
    """The store is not set up as required (a policy not attached, a permission not enforced, ...)."""


def policy_document(role: str, buckets: dict[str, str]) -> dict[str, Any]:
    text = (POLICY_DIR / f"{role}.json").read_text(encoding="utf-8")
    for name, value in buckets.items():
        text = text.replace("${" + name + "}", value)
    if "${" in text:
        raise SetupError(f"policy {role}.json has an unresolved variable")
    return json.loads(text)


Key = tuple[str, str]  # (access key id, secret)


def boto_credentials(key: Key) -> dict[str, str]:
    return dict(zip(("aws_access_key_id", "aws_secret_access_key"), key))


def s3_client(endpoint: str, region: str, key: Key) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=region,
        **boto_credentials(key),
        config=Config(retries={"max_attempts": 2}, connect_timeout=5, read_timeout=30, s3={"addressing_style": "path"}),
    )


def error_code(error: Exception) -> str:
    response = getattr(error, "response", None) or {}
    return str(response.get("Error", {}).get("Code", "")) or type(error).__name__


def allowed(call: Callable[[], Any]) -> bool:
    """True when the call succeeds, False when the store refuses it; anything else is raised."""
    try:
        call()
        return True
    except Exception as error:  # botocore ClientError: refused is an answer, the rest is not
        if error_code(error) in DENIED:
            return False
        raise


# --------------------------------------------------------------------------- admin back-ends
class IamAdmin:
    """Users, managed policies and keys through the IAM API."""

    def __init__(self, endpoint: str, region: str, key: Key) -> None:
        import boto3

        self.endpoint, self.region = endpoint, region
        self.iam = boto3.client("iam", endpoint_url=endpoint, region_name=region, **boto_credentials(key))

    def ensure_user(self, user: str, policy_name: str, document: dict[str, Any], given: Key | None = None) -> Key:
        if given:
            raise SetupError("the IAM API issues its own keys: S3_ROLE_KEYS=given works with S3_ADMIN_API=minio only")
        iam = self.iam
        try:
            iam.create_user(UserName=user)
        except iam.exceptions.EntityAlreadyExistsException:
            for key in iam.list_access_keys(UserName=user)["AccessKeyMetadata"]:  # rotate: old keys go
                iam.delete_access_key(UserName=user, AccessKeyId=key["AccessKeyId"])
        arn = self._ensure_policy(policy_name, document)
        iam.attach_user_policy(UserName=user, PolicyArn=arn)
        created = iam.create_access_key(UserName=user)["AccessKey"]
        return created["AccessKeyId"], created["SecretAccessKey"]

    def _ensure_policy(self, name: str, document: dict[str, Any]) -> str:
        iam = self.iam
        body = json.dumps(document)
        try:
            return iam.create_policy(PolicyName=name, PolicyDocument=body)["Policy"]["Arn"]
        except iam.exceptions.EntityAlreadyExistsException:
            arn = next(p["Arn"] for p in iam.list_policies(Scope="Local")["Policies"] if p["PolicyName"] == name)
            iam.create_policy_version(PolicyArn=arn, PolicyDocument=body, SetAsDefault=True)
            return arn

    def attached_policies(self, user: str) -> set[str]:
        return {p["PolicyName"] for p in self.iam.list_attached_user_policies(UserName=user)["AttachedPolicies"]}


class MinioAdminApi:
    """Users and policies through MinIO's admin API. Not run here (no MinIO image): see infra/README.md."""

    def __init__(self, endpoint: str, key: Key) -> None:
        from urllib.parse import urlparse

        from minio import MinioAdmin
        from minio.credentials import StaticProvider

        url = urlparse(endpoint)
        self.admin = MinioAdmin(endpoint=url.netloc, credentials=StaticProvider(*key), secure=url.scheme == "https")

    def ensure_user(self, user: str, policy_name: str, document: dict[str, Any], given: Key | None = None) -> Key:
        user, generated = given or (user, secrets.token_urlsafe(30))
        self.admin.policy_add(policy_name, policy=document)
        self.admin.user_add(user, generated)  # MinIO: the user name is the access key; re-adding rotates it
        try:
            self.admin.attach_policy([policy_name], user=user)
        except Exception as error:  # already attached is fine; attached_policies() checks the outcome
            if "already" not in str(error).lower():
                raise
        return user, generated

    def attached_policies(self, user: str) -> set[str]:
        info = json.loads(self.admin.user_info(user))
        return {p.strip() for p in str(info.get("policyName", "")).split(",") if p.strip()}


# --------------------------------------------------------------------------- moto bootstrap
def bootstrap_admin(endpoint: str, region: str, max_probes: int = 200) -> Key:
    """moto only: an admin user made in the unauthenticated window, then prove that the window has closed."""
    import boto3

    anonymous = ("bootstrap", "bootstrap")  # any key is accepted inside the window; none after it
    iam = boto3.client("iam", endpoint_url=endpoint, region_name=region, **boto_credentials(anonymous))
    admin = f"{USER_PREFIX}store-admin"
    iam.create_user(UserName=admin)
    iam.put_user_policy(
        UserName=admin,
        PolicyName="store-admin",
        PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": ["s3:*", "iam:*"], "Resource": "*"}]}
        ),
    )
    created = iam.create_access_key(UserName=admin)["AccessKey"]
    probe = s3_client(endpoint, region, anonymous)
    for _ in range(max_probes):  # each unauthenticated request uses up the window; stop once refused
        if not allowed(probe.list_buckets):
            return created["AccessKeyId"], created["SecretAccessKey"]
    raise SetupError(f"the store still accepts unsigned requests after {max_probes} probes: authentication is off")


# --------------------------------------------------------------------------- checks
def verify_role(role: str, client: Any, buckets: dict[str, str]) -> list[str]:
    """Probe what the role's key may do; return what disagrees with its policy."""
    data, models = buckets["DVC_BUCKET"], buckets["MLFLOW_BUCKET"]
    probe_key = f"_tp-policy-check/{role}-{secrets.token_hex(4)}"
    expected = {
        "training": {("put", data): True, ("put", models): True, ("list", data): True},
        "mlflow": {("put", models): True, ("put", data): False, ("list", data): False},
        "serving": {("list", models): True, ("put", models): False, ("put", data): False, ("list", data): False},
    }[role]
    problems = []
    for (action, bucket), want in expected.items():
        if action == "put":
            got = allowed(lambda bucket=bucket: client.put_object(Bucket=bucket, Key=probe_key, Body=b"policy check"))
            if got:
                allowed(lambda bucket=bucket: client.delete_object(Bucket=bucket, Key=probe_key))
        else:
            got = allowed(lambda bucket=bucket: client.list_objects_v2(Bucket=bucket, MaxKeys=1))
        if got != want:
            problems.append(f"{role} {'may' if got else 'may not'} {action} in bucket {bucket}")
    return problems


def write_credentials(directory: Path, role: str, key: Key) -> Path:
    path = directory / role / "credentials"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write("[default]\n" + "".join(f"{name} = {value}\n" for name, value in boto_credentials(key).items()))
    os.replace(tmp, path)
    return path


def read_credentials(path: Path) -> Key:
    import configparser

    parser = configparser.ConfigParser()
    if not parser.read(path) or "default" not in parser:
        raise SetupError(f"{path}: no [default] credentials (S3_ROLE_KEYS=given)")
    section = parser["default"]
    return section["aws_access_key_id"], section["aws_secret_access_key"]


def wait_for_store(endpoint: str, path: str = "/", timeout_s: float = 120) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + timeout_s
    while True:
        try:
            urllib.request.urlopen(endpoint.rstrip("/") + path, timeout=5)
            return
        except urllib.error.HTTPError:
            return  # it answers (403 for an unsigned request is an answer)
        except OSError:
            if time.monotonic() > deadline:
                raise SetupError(f"object store at {endpoint} not reachable after {timeout_s:.0f} s") from None
            time.sleep(2)


def main() -> int:
    env = os.environ
    endpoint = env.get("S3_ENDPOINT_URL", "http://minio:9000")
    region = env.get("S3_REGION", "us-east-1")
    api = env.get("S3_ADMIN_API", "minio")
    out_dir = Path(env.get("S3_CREDENTIALS_DIR", "/run/s3-roles"))
    # generate: new keys, written to <dir>/<role>/credentials (compose); given: read from there (Kubernetes
    # Secrets mounted read-only; MinIO only, whose users are named by their access key).
    keys_mode = env.get("S3_ROLE_KEYS", "generate")
    buckets = {"DVC_BUCKET": env.get("DVC_BUCKET", "dvc"), "MLFLOW_BUCKET": env.get("MLFLOW_BUCKET", "mlflow")}
    try:
        bootstrap = api == "iam" and env.get("S3_BOOTSTRAP_ADMIN") == "1"
        # moto counts every S3 request, even an unsigned probe, against its unauthenticated window:
        # wait on its own API instead (which it does not count).
        wait_for_store(endpoint, "/moto-api/" if bootstrap else "/")
        if api == "iam":
            if bootstrap:
                admin_key = bootstrap_admin(endpoint, region)
            else:
                admin_key = (env["S3_ADMIN_ACCESS_KEY"], env["S3_ADMIN_SECRET_KEY"])
            admin: Any = IamAdmin(endpoint, region, admin_key)
        elif api == "minio":
            admin_key = (env["MINIO_ROOT_USER"], env["MINIO_ROOT_PASSWORD"])
            admin = MinioAdminApi(endpoint, admin_key)
        else:
            raise SetupError(f"S3_ADMIN_API must be minio or iam, not {api!r}")
        root = s3_client(endpoint, region, admin_key)
        for bucket in buckets.values():
            if not allowed(lambda bucket=bucket: root.head_bucket(Bucket=bucket)):
                raise SetupError(f"the admin key may not use bucket {bucket}")
    except KeyError as missing:
        print(f"store-init: {missing.args[0]} is not set", file=sys.stderr)
        return 2
    except SetupError as error:
        print(f"store-init: {error}", file=sys.stderr)
        return 1
    except Exception as error:  # a missing bucket answers 404: create it, then go on
        if error_code(error) not in {"404", "NoSuchBucket", "NotFound"}:
            print(f"store-init: {type(error).__name__}: {error_code(error)}", file=sys.stderr)
            return 1

    for bucket in buckets.values():
        try:
            root.create_bucket(Bucket=bucket)
            print(f"store-init: bucket {bucket} created")
        except Exception as error:
            if error_code(error) not in {"BucketAlreadyOwnedByYou", "BucketAlreadyExists"}:
                print(f"store-init: creating bucket {bucket}: {error_code(error)}", file=sys.stderr)
                return 1

    failures = []
    for role in ROLES:
        user, policy_name = f"{USER_PREFIX}{role}", f"{USER_PREFIX}{role}"
        try:
            given = read_credentials(out_dir / role / "credentials") if keys_mode == "given" else None
            role_key = admin.ensure_user(user, policy_name, policy_document(role, buckets), given)
        except SetupError as error:
            print(f"store-init: {error}", file=sys.stderr)
            return 1
        user = role_key[0] if given else user
        attached = admin.attached_policies(user)
        if policy_name not in attached:
            failures.append(
                f"policy {policy_name} is not attached to user {user} (attached: {sorted(attached) or 'none'})"
            )
            continue
        client = s3_client(endpoint, region, role_key)
        for attempt in range(5):  # a new key can take a moment to be accepted (eventual consistency on AWS)
            problems = verify_role(role, client, buckets)
            if not any(" may not " in p for p in problems):
                break
            time.sleep(2 * (attempt + 1))
        if problems:
            failures.extend(problems)
            continue
        where = "given key" if given else f"key written to {write_credentials(out_dir, role, role_key)}"
        print(f"store-init: user {user}, policy {policy_name} attached and enforced; {where}")
    if failures:
        for failure in failures:
            print(f"store-init: {failure}", file=sys.stderr)
        print(
            "store-init: FAILED: fix the policies above; services without a credentials file cannot start",
            file=sys.stderr,
        )
        return 1
    print(f"store-init: buckets {', '.join(buckets.values())}; roles {', '.join(ROLES)} ready")
    return 0


if __name__ == "__main__":
    sys.exit(main())
