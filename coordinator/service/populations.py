"""Several populations on one coordinator: `default` (the coordinator's own database, today's /v1/...
paths) and named ones an operator creates with a model file (served at /v1/populations/{name}/...).

Each named population is a complete set of services on a database of its own -- a SQLite file in
`<db>.populations/`, or a PostgreSQL schema `pf_population_<name>` of the same database (every replica
opens the same one) -- with its own model versions, round settings, rounds, releases, devices and
enrollment key. Isolation is structural: no statement of one population's store can name another's
rows, so a device token of one population is simply unknown to another (401). The registry (name,
the enrollment key's sha256, who created it) is a table of the default database.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
import time
from collections.abc import Callable
from pathlib import Path

import sqlalchemy as sa

from coordinator.errors import Refused
from coordinator.service import Services, open_services
from coordinator.service.evaluation import EvaluateFn
from coordinator.service.modelfile import model_info, parse_model
from coordinator.settings import new_secret
from coordinator.store import is_url

log = logging.getLogger("pocketfed.coordinator")

DEFAULT = "default"
NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")


def check_name(name: str) -> str:
    if not NAME.fullmatch(name) or name == DEFAULT:
        raise Refused(
            422,
            f"name: {name[:60]!r} is not a population name (a-z first, then a-z, 0-9 or _, at most 40; "
            f"not {DEFAULT!r})",
            "bad_population",
        )
    return name


def population_db(db: str, name: str) -> str:
    """Where population `name` keeps its state, from the coordinator's --db."""
    if is_url(db):
        url = sa.make_url(db).update_query_dict({"options": f"-c search_path={schema_name(name)}"})
        return url.render_as_string(hide_password=False)
    path = Path(db)
    return str(path.with_name(f"{path.stem}.populations") / f"{name}.db")


def schema_name(name: str) -> str:
    return f"pf_population_{name}"


def prepare_location(db: str, name: str) -> None:
    """Make the place the population's database goes (its directory, or its PostgreSQL schema)."""
    if not is_url(db):
        Path(population_db(db, name)).parent.mkdir(parents=True, exist_ok=True)
        return
    url = sa.make_url(db).set(drivername="postgresql+psycopg")
    engine = sa.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql(f'CREATE SCHEMA IF NOT EXISTS "{schema_name(check_name(name))}"')
    finally:
        engine.dispose()


class Populations:
    """The default population's services and the named ones', opened once per process and kept."""

    def __init__(
        self, default: Services, *, clock: Callable[[], float] = time.time, evaluate: EvaluateFn | None = None
    ):
        self.default, self.clock = default, clock
        self._evaluate = evaluate  # tests inject one for every population; --eval-data is the default's
        self._open: dict[str, Services] = {}
        self._lock = threading.Lock()
        self._serving = False

    def open_registered(self) -> None:
        """Startup: open every population the registry has (their rounds settle in the background)."""
        for name in self.default.store.populations():
            self.get(name)

    def names(self) -> list[str]:
        return [DEFAULT, *self.default.store.populations()]

    def registry(self) -> dict[str, tuple]:
        return self.default.store.populations()

    def get(self, name: str) -> Services | None:
        """The population's services (opened on first use: another replica may have created it)."""
        if name == DEFAULT:
            return self.default
        services = self._open.get(name)
        if services is not None:
            return services
        if not NAME.fullmatch(name):
            return None
        with self._lock:
            if name in self._open:
                return self._open[name]
            row = self.default.store.populations().get(name)
            if row is None:
                return None
            return self._start(name, key_hash=row[1])

    def _start(self, name: str, *, key_hash: str, initial: bytes | None = None) -> Services:
        base = self.default.settings
        settings = base.model_copy(update={"db": population_db(base.db, name), "eval_data": None})
        services = open_services(
            settings, clock=self.clock, evaluate=self._evaluate, initial_model=initial, population=name
        )
        services.enrollment_key_hash = key_hash
        self._open[name] = services
        if self._serving:
            services.ticker.start()
        return services

    def create(self, name: str, model: bytes, by: str) -> tuple[Services, str]:
        """A new population on `model` (its v0, released), with a fresh enrollment key (returned once)."""
        check_name(name)
        container = parse_model(model)  # a bad file is refused before anything is made
        with self._lock:
            registry = self.default.store.populations()
            if name in registry:
                raise Refused(409, f"population {name!r} exists already", "population_exists")
            limit = self.default.settings.max_populations
            if len(registry) >= limit:
                raise Refused(409, f"name: this coordinator serves at most {limit} named populations", "too_many")
            key = new_secret()
            key_hash = hashlib.sha256(key.encode()).hexdigest()
            prepare_location(self.default.settings.db, name)
            services = self._start(name, key_hash=key_hash, initial=model)
            try:
                with self.default.store.transaction() as tx:
                    tx.add_population(name, key_hash, model_info(model, container).architecture, self.clock(), by)
            except sa.exc.IntegrityError:  # another replica created it meanwhile
                self._open.pop(name).close()
                raise Refused(409, f"population {name!r} exists already", "population_exists") from None
        log.info("population %s created by %s", name, by)
        return services, key

    def start(self) -> None:
        self._serving = True
        for services in list(self._open.values()):
            services.ticker.start()

    def close(self) -> None:
        for services in list(self._open.values()):
            services.close()
        self._open.clear()
