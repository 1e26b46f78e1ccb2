"""The handbook simulator: determinism, schema, fraud scenarios and windowed features."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline.errors import ConfigError
from pipeline.features import HANDBOOK_FEATURES, WINDOWS
from pipeline.streamfeatures import feature_table as add_features
from producer.simulator import SimulatorConfig, simulate

SMALL = SimulatorConfig(n_customers=300, n_terminals=600, n_days=40, seed=7)
MEDIUM = SimulatorConfig(n_customers=1000, n_terminals=2000, n_days=90, seed=3)

EXPECTED_DTYPES = {
    "TRANSACTION_ID": "int64",
    "TX_DATETIME": "datetime64[ns]",
    "CUSTOMER_ID": "int64",
    "TERMINAL_ID": "int64",
    "TX_AMOUNT": "float32",
    "TX_TIME_SECONDS": "int64",
    "TX_TIME_DAYS": "int32",
    "TX_FRAUD": "int32",
    "TX_FRAUD_SCENARIO": "int32",
    "TX_DURING_WEEKEND": "int32",
    "TX_DURING_NIGHT": "int32",
    **{name: "float32" for name in HANDBOOK_FEATURES[3:]},
}
REFERENCE_ORDER = [
    *list(EXPECTED_DTYPES)[:11],
    *(
        f"{entity}_{kind}_{w}DAY_WINDOW"
        for entity, kinds in (("CUSTOMER_ID", ("NB_TX", "AVG_AMOUNT")), ("TERMINAL_ID", ("NB_TX", "RISK")))
        for w in WINDOWS
        for kind in kinds
    ),
]


@pytest.fixture(scope="module")
def small() -> pd.DataFrame:
    return simulate(SMALL)


@pytest.fixture(scope="module")
def medium() -> pd.DataFrame:
    return simulate(MEDIUM)


def test_same_seed_same_frame_other_seed_other_frame(small: pd.DataFrame) -> None:
    pd.testing.assert_frame_equal(small, simulate(SMALL))
    other = simulate(SimulatorConfig(n_customers=300, n_terminals=600, n_days=40, seed=8))
    assert not small.equals(other)


def test_columns_dtypes_and_order(small: pd.DataFrame) -> None:
    assert list(small.columns) == REFERENCE_ORDER
    assert {c: str(t) for c, t in small.dtypes.items()} == EXPECTED_DTYPES
    assert small["TX_DATETIME"].dt.tz is None


def test_rows_in_time_order_with_consistent_time_columns(small: pd.DataFrame) -> None:
    assert small["TX_DATETIME"].is_monotonic_increasing
    assert (small["TRANSACTION_ID"].to_numpy() == np.arange(len(small))).all()
    start = pd.Timestamp(SMALL.start_date)
    assert (small["TX_DATETIME"] == start + pd.to_timedelta(small["TX_TIME_SECONDS"], "s")).all()
    assert (small["TX_TIME_DAYS"] == small["TX_TIME_SECONDS"] // 86_400).all()
    assert small["TX_TIME_DAYS"].between(0, SMALL.n_days - 1).all()


def test_no_missing_or_infinite_values(medium: pd.DataFrame) -> None:
    numeric = medium.drop(columns="TX_DATETIME").to_numpy(np.float64)
    assert np.isfinite(numeric).all()
    assert (medium["TX_AMOUNT"] >= 0).all()


def test_fraud_rate_near_handbook_and_all_scenarios_present(medium: pd.DataFrame) -> None:
    assert 0.003 < medium["TX_FRAUD"].mean() < 0.02
    assert set(medium["TX_FRAUD_SCENARIO"].unique()) == {0, 1, 2, 3}
    assert ((medium["TX_FRAUD_SCENARIO"] > 0) == (medium["TX_FRAUD"] == 1)).all()


def test_amount_above_220_is_always_fraud(medium: pd.DataFrame) -> None:
    high = medium["TX_AMOUNT"] > 220
    assert (medium.loc[high, "TX_FRAUD"] == 1).all()
    assert (medium.loc[medium["TX_FRAUD_SCENARIO"] == 1, "TX_AMOUNT"] > 220).all()


def test_scenario_two_terminals_are_fraud_for_whole_days(medium: pd.DataFrame) -> None:
    keys = [medium["TERMINAL_ID"], medium["TX_TIME_DAYS"]]
    has_two = (medium["TX_FRAUD_SCENARIO"] == 2).groupby(keys).any()
    all_fraud = medium["TX_FRAUD"].groupby(keys).min()
    assert has_two.any()
    assert (all_fraud[has_two] == 1).all()


def test_weekend_and_night_flags(small: pd.DataFrame) -> None:
    when = small["TX_DATETIME"]
    assert (small["TX_DURING_WEEKEND"] == (when.dt.day_of_week >= 5)).all()
    assert (small["TX_DURING_NIGHT"] == (when.dt.hour <= 6)).all()


def _handbook_customer_features(df: pd.DataFrame) -> pd.DataFrame:
    """The handbook's own pandas code, one customer at a time."""

    def one(customer: pd.DataFrame) -> pd.DataFrame:
        amount = customer.set_index("TX_DATETIME")["TX_AMOUNT"].astype(np.float64)
        out = pd.DataFrame(index=customer.index)
        for w in WINDOWS:
            nb = amount.rolling(f"{w}D").count().to_numpy()
            out[f"CUSTOMER_ID_NB_TX_{w}DAY_WINDOW"] = nb
            out[f"CUSTOMER_ID_AVG_AMOUNT_{w}DAY_WINDOW"] = (
                amount.rolling(f"{w}D").sum().to_numpy() / nb
            )
        return out

    return pd.concat([one(g) for _, g in df.groupby("CUSTOMER_ID")]).sort_index()


def _handbook_terminal_features(df: pd.DataFrame, delay: int = 7) -> pd.DataFrame:
    """The handbook's own pandas code: rolling(delay + w) minus rolling(delay), per terminal."""

    def one(terminal: pd.DataFrame) -> pd.DataFrame:
        fraud = terminal.set_index("TX_DATETIME")["TX_FRAUD"].astype(np.float64)
        nb_delay = fraud.rolling(f"{delay}D").count()
        fraud_delay = fraud.rolling(f"{delay}D").sum()
        out = pd.DataFrame(index=terminal.index)
        for w in WINDOWS:
            nb = (fraud.rolling(f"{delay + w}D").count() - nb_delay).to_numpy()
            frauds = (fraud.rolling(f"{delay + w}D").sum() - fraud_delay).to_numpy()
            out[f"TERMINAL_ID_NB_TX_{w}DAY_WINDOW"] = nb
            with np.errstate(invalid="ignore"):
                out[f"TERMINAL_ID_RISK_{w}DAY_WINDOW"] = np.nan_to_num(frauds / nb, nan=0.0)
        return out

    return pd.concat([one(g) for _, g in df.groupby("TERMINAL_ID")]).sort_index()


@pytest.mark.parametrize("reference", [_handbook_customer_features, _handbook_terminal_features])
def test_windowed_features_match_the_handbook_pandas_code(small: pd.DataFrame, reference) -> None:
    entity = "CUSTOMER_ID" if reference is _handbook_customer_features else "TERMINAL_ID"
    busiest = small.groupby(entity)["TX_FRAUD"].sum().nlargest(100).index
    sample = small[small[entity].isin(busiest)]  # an entity's features use its own rows only
    expected = reference(sample)
    assert (expected.filter(like="RISK").to_numpy() > 0).any() or entity == "CUSTOMER_ID"
    got = sample[expected.columns].astype(np.float64)
    np.testing.assert_allclose(got.to_numpy(), expected.to_numpy(), rtol=1e-5, atol=1e-4)


def test_window_edges_and_same_second_rows_follow_pandas() -> None:
    day = 86_400
    seconds = np.array([0, 0, day, day, 8 * day, 8 * day + 1, 9 * day], dtype=np.int64)
    frame = pd.DataFrame(
        {
            "TX_DATETIME": pd.Timestamp("2018-04-01") + pd.to_timedelta(seconds, "s"),
            "TX_TIME_SECONDS": seconds,
            "CUSTOMER_ID": np.zeros(7, dtype=np.int64),
            "TERMINAL_ID": np.zeros(7, dtype=np.int64),
            "TX_AMOUNT": np.array([10.0, 20, 30, 40, 50, 60, 70]),
            "TX_FRAUD": np.array([1, 0, 0, 1, 0, 0, 0]),
        }
    )
    got = add_features(frame)
    expected = pd.concat(
        [_handbook_customer_features(frame), _handbook_terminal_features(frame)], axis=1
    )
    np.testing.assert_allclose(got[expected.columns].to_numpy(np.float64), expected.to_numpy())
    assert got["CUSTOMER_ID_NB_TX_1DAY_WINDOW"].tolist() == [1, 2, 1, 2, 1, 2, 2]


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n_customers", 0),
        ("n_terminals", -1),
        ("n_days", 2.5),
        ("n_days", True),
        ("radius", 0.0),
        ("radius", float("nan")),
        ("seed", -1),
        ("start_date", "April 1st"),
        ("start_date", "1500-01-01"),  # outside what nanosecond timestamps hold
        ("terminals_compromised_per_day", -0.5),
    ],
)
def test_bad_config_is_refused_with_the_field_named(field: str, value: object) -> None:
    with pytest.raises(ConfigError, match=field):
        SimulatorConfig(**{field: value})


def test_compromise_rates_scale_with_population() -> None:
    config = SimulatorConfig(n_customers=500, n_terminals=1000)
    assert config.terminal_rate == pytest.approx(0.2)
    assert config.customer_rate == pytest.approx(0.3)
    assert SimulatorConfig(terminals_compromised_per_day=0).terminal_rate == 0.0


def test_a_simulation_without_transactions_is_refused_with_a_message() -> None:
    # Five terminals on a 100 x 100 grid leave every customer without one within its radius.
    with pytest.raises(ConfigError, match="make no transactions"):
        simulate(SimulatorConfig(n_customers=5, n_terminals=5, n_days=1))


def test_compact_start_dates_mean_the_same_day() -> None:
    # numpy reads "20180401" as a number of years; the simulator must not.
    compact = simulate(SimulatorConfig(n_customers=50, n_terminals=100, n_days=2, start_date="20180401"))
    assert compact["TX_DATETIME"].min() >= pd.Timestamp("2018-04-01")
    assert compact["TX_DATETIME"].max() < pd.Timestamp("2018-04-03")


def test_the_config_module_imports_neither_numpy_nor_pandas() -> None:
    import subprocess
    import sys

    code = "import sys, producer.simconfig; print(sorted({'numpy', 'pandas'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
