"""The team's roles as MLflow permissions, and the MANAGE check of detloop's human decisions.

A role (``cfg.team.roles``: reader, trainer, reviewer) is one permission on each experiment of
``cfg.team.experiments`` and one on the registered model ``cfg.mlflow.registered_model``, granted per
user on a server running MLflow's basic-auth app. The server's admin first creates those resources
(:func:`init`), so that no trainer becomes their creator (MLflow gives a creator MANAGE).

MLflow cannot tell "register a version" from "set an alias": both need ``update`` on the registered
model (``validate_can_create_model_version`` and ``validate_can_set_model_or_prompt_version_alias`` in
``mlflow.server.auth``), which EDIT grants. detloop's human decisions (``promote``, ``rollback``)
therefore also call :func:`require_manage`, which asks the server for the user's own permission.
"""

from __future__ import annotations

import logging
import os
from urllib.parse import urlparse

from omegaconf import DictConfig

from detloop.core.errors import BadInput, PermissionRefused, TrackingUnavailable
from detloop.tracking import failures, store

log = logging.getLogger(__name__)

EXPERIMENT = "experiment"
REGISTERED_MODEL = "registered_model"
PERMISSIONS = ("READ", "USE", "EDIT", "MANAGE")
CURRENT_USER = "/api/2.0/mlflow/users/current"
LIST_USERS = "/api/2.0/mlflow/users/list"


# --------------------------------------------------------------------------- the server and who calls it


def server_uri(cfg: DictConfig) -> str:
    """The configured tracking URI; BadInput unless it is an http(s) server (basic auth needs one)."""
    uri = store.tracking_uri(cfg)
    if urlparse(uri).scheme not in ("http", "https"):
        raise BadInput(
            f"team commands need an MLflow server with basic auth; the tracking URI is {uri}",
            [
                "local try-out: detloop team up, then source build/team/env.sh",
                "a shared server: set MLFLOW_TRACKING_URI=http(s)://... and MLFLOW_TRACKING_USERNAME / "
                "MLFLOW_TRACKING_PASSWORD",
            ],
        )
    return uri


def _connect(uri: str) -> None:
    """Point MLflow at ``uri`` after checking it answers /health (TrackingUnavailable naming it otherwise)."""
    import mlflow
    import requests

    try:
        requests.get(uri.rstrip("/") + "/health", timeout=10).raise_for_status()
    except requests.RequestException as err:
        raise TrackingUnavailable(f"MLflow tracking server {uri} is unreachable: {err}") from err
    mlflow.set_tracking_uri(uri)


def _rest(uri: str, endpoint: str, method: str = "GET", **kwargs) -> dict:
    """One call of the auth REST API with the caller's credentials (MLFLOW_TRACKING_USERNAME / _PASSWORD)."""
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request, verify_rest_response

    response = verify_rest_response(http_request(get_default_host_creds(uri), endpoint, method, **kwargs), endpoint)
    return response.json() if response.content else {}


def _auth_client(uri: str):
    """MLflow's basic-auth client (``mlflow.server.get_app_client``), its import warnings of the server side hushed."""
    import warnings

    import mlflow.server

    with warnings.catch_warnings():  # loading the client imports the auth app: Starlette deprecation warnings
        warnings.simplefilter("ignore")
        return mlflow.server.get_app_client("basic-auth", tracking_uri=uri)


def current_user(uri: str) -> dict:
    """``{"username", "is_admin"}`` of the credentials in the environment, as the server sees them."""
    with failures.acting("reading the current user (MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)"):
        user = _rest(uri, CURRENT_USER)["user"]
    return {"username": user["username"], "is_admin": bool(user["is_admin"])}


def _require_admin(uri: str, action: str) -> str:
    user = current_user(uri)
    if not user["is_admin"]:
        raise PermissionRefused(
            f"{action} needs the admin of MLflow server {uri}; user {user['username']!r} is not an admin "
            "(use the admin login, e.g. source build/team/env.sh of detloop team up)"
        )
    return user["username"]


# --------------------------------------------------------------------------- roles


def resources(cfg: DictConfig) -> list[tuple[str, str]]:
    """(resource type, name) of everything a role covers: the team's experiments, then the registered model."""
    names = dict.fromkeys(str(n) for n in cfg.team.experiments)
    return [*((EXPERIMENT, n) for n in names), (REGISTERED_MODEL, str(cfg.mlflow.registered_model))]


def role_grants(cfg: DictConfig, role: str) -> list[tuple[str, str, str]]:
    """(resource type, experiment or model name, permission) of ``role``; BadInput naming the config key if unknown."""
    roles = cfg.team.roles
    if role not in roles:
        raise BadInput(f"unknown role {role!r}", [f"roles in conf/team/default.yaml (team.roles): {', '.join(roles)}"])
    spec = roles[role]
    for key in ("experiments", "registered_model"):
        if spec.get(key) not in PERMISSIONS:
            raise BadInput(
                f"bad permission in team.roles.{role}.{key}: {spec.get(key)!r}", [f"one of {', '.join(PERMISSIONS)}"]
            )
    permission = {EXPERIMENT: str(spec.experiments), REGISTERED_MODEL: str(spec.registered_model)}
    return [(kind, name, permission[kind]) for kind, name in resources(cfg)]


def init(cfg: DictConfig) -> dict:
    """As the server's admin: create the role-covered experiments and the registered model if missing.

    Returns ``{"experiments": {name: id}, "registered_model": name, "created": [names created now]}``.
    """
    import mlflow
    from mlflow.exceptions import MlflowException

    uri = server_uri(cfg)
    _connect(uri)
    _require_admin(uri, "detloop team init")
    client = mlflow.MlflowClient(tracking_uri=uri)
    experiments, created = {}, []
    with failures.acting("creating the team's experiments and registered model", needs="the admin login"):
        for kind, name in resources(cfg):
            if kind == EXPERIMENT:
                found = client.get_experiment_by_name(name)
                experiments[name] = found.experiment_id if found else client.create_experiment(name)
                created += [] if found else [name]
        model = str(cfg.mlflow.registered_model)
        try:
            client.create_registered_model(model)
            created.append(model)
        except MlflowException as err:
            if err.error_code != "RESOURCE_ALREADY_EXISTS":
                raise
    for name in created:
        log.info("created %s on %s", name, uri)
    return {"experiments": experiments, "registered_model": model, "created": created}


def _grant(client, username: str, resource_type: str, resource_id: str, permission: str) -> str:
    """Give ``username`` exactly ``permission`` on the resource; returns 'granted', 'changed' or 'kept'."""
    from mlflow.exceptions import MlflowException

    try:
        client.grant_user_permission(username, resource_type, resource_id, permission)
        return "granted"
    except MlflowException as err:
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
    if client.get_user_permission(username, resource_type, resource_id).permission == permission:
        return "kept"
    client.revoke_user_permission(username, resource_type, resource_id)
    client.grant_user_permission(username, resource_type, resource_id, permission)
    return "changed"


def _create_user(client, username: str, password: str) -> None:
    """Create the user; BadInput with the server's reason when it refuses the name or the password."""
    from mlflow.exceptions import MlflowException

    try:
        client.create_user(username, password)
    except MlflowException as err:
        if err.error_code != "INVALID_PARAMETER_VALUE":
            raise
        raise BadInput(f"the server refused the new user {username!r}", [err.message]) from err


def add_user(cfg: DictConfig, username: str, role: str, password: str | None) -> dict:
    """As the admin: create ``username`` if missing (with ``password``) and give it ``role``'s permissions.

    Idempotent: an existing user keeps its password; its permissions become the role's.
    """
    from mlflow.exceptions import MlflowException

    grants = role_grants(cfg, role)
    if not username or username != username.strip() or ":" in username:
        raise BadInput(f"bad user name {username!r}", ["a non-empty name without spaces at its ends or ':'"])
    made = init(cfg)
    uri = server_uri(cfg)
    client = _auth_client(uri)
    with failures.acting(f"adding user {username!r} as {role}", needs="the admin login"):
        try:
            client.get_user(username)
            created = False
        except MlflowException as err:
            if err.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            if not password:
                raise BadInput(f"user {username!r} does not exist yet and no password was given") from err
            _create_user(client, username, password)
            created = True
        done = []
        for resource_type, name, permission in grants:
            resource_id = made["experiments"][name] if resource_type == EXPERIMENT else name
            outcome = _grant(client, username, resource_type, resource_id, permission)
            done.append({"resource_type": resource_type, "name": name, "permission": permission, "outcome": outcome})
    return {"user": username, "role": role, "created": created, "grants": done}


def _role_of(cfg: DictConfig, permissions: dict[str, str]) -> str:
    """The role whose grants equal ``permissions`` (name -> permission), else 'custom'."""
    for role in cfg.team.roles:
        if all(permissions.get(name) == permission for _, name, permission in role_grants(cfg, role)):
            return str(role)
    return "custom"


def users(cfg: DictConfig) -> list[dict]:
    """As the admin: every user of the server with its permissions on the team's resources and its role."""
    import mlflow

    uri = server_uri(cfg)
    _connect(uri)
    _require_admin(uri, "detloop team users")
    client, tracking = _auth_client(uri), mlflow.MlflowClient(tracking_uri=uri)
    with failures.acting("listing the server's users", needs="the admin login"):
        ids = {}
        for kind, name in resources(cfg):
            found = tracking.get_experiment_by_name(name) if kind == EXPERIMENT else None
            ids[name] = found.experiment_id if found else (None if kind == EXPERIMENT else name)
        out = []
        for user in _rest(uri, LIST_USERS)["users"]:
            permissions = {}
            for resource_type, name in resources(cfg):
                resource_id = ids[name]
                if resource_id is not None:
                    found = client.get_user_permission(user["username"], resource_type, resource_id)
                    permissions[name] = found.permission
            role = "admin" if user["is_admin"] else _role_of(cfg, permissions)
            out.append(
                {"user": user["username"], "is_admin": user["is_admin"], "role": role, "permissions": permissions}
            )
    return out


# --------------------------------------------------------------------------- human decisions


def require_manage(cfg: DictConfig, action: str) -> None:
    """Refuse ``action`` (PermissionRefused, exit 3) unless the current user may MANAGE the registered model.

    Applies only on an http(s) tracking server with credentials (MLFLOW_TRACKING_USERNAME set); a local
    store has no users. The server's admin passes; anyone else needs MANAGE on ``mlflow.registered_model``,
    which the user's own credentials may ask the server about (``users/permissions/get``).
    """
    uri = store.tracking_uri(cfg)
    username = os.environ.get("MLFLOW_TRACKING_USERNAME")
    if urlparse(uri).scheme not in ("http", "https") or not username:
        return
    model = str(cfg.mlflow.registered_model)
    _connect(uri)
    if current_user(uri)["is_admin"]:
        return
    with failures.acting(f"checking the permission of {username!r} on registered model {model!r}"):
        permission = _auth_client(uri).get_user_permission(username, REGISTERED_MODEL, model).permission
    if permission != "MANAGE":
        raise PermissionRefused(
            f"{action} needs MANAGE on registered model {model!r} of {uri}; user {username!r} has "
            f"{permission} (a reviewer: detloop team add-user {username} reviewer, run by the admin)"
        )
