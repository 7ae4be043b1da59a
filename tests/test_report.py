"""Reading finished runs back (pipeline/report/card.py): the component table of the report card."""

from pipeline.report.card import component_rows

W = {"correctness": 0.6, "concision": 0.4}


def test_component_rows_take_each_column_from_its_own_evaluation():
    sft = {
        "eval/pretrain/gold/correctness": 0.1,
        "eval/pretrain/gold/concision": 0.2,
        "eval/gold/correctness": 0.5,
        "eval/gold/concision": 0.7,
    }
    ppo = {
        "eval/sft_gold/correctness": 0.45,
        "eval/sft_gold/concision": 0.75,
        "eval/gold/correctness": 0.3,
        "eval/gold/concision": 0.9,
    }
    rows = component_rows({"sft": {"metrics": sft}, "ppo": {"metrics": ppo}}, W)
    assert rows == [("correctness", 0.6, 0.1, 0.5, 0.45, 0.3), ("concision", 0.4, 0.2, 0.7, 0.75, 0.9)]
    # PPO not run yet: its columns are empty, the rest stands
    assert component_rows({"sft": {"metrics": sft}}, W)[0] == ("correctness", 0.6, 0.1, 0.5, None, None)
    # nothing evaluated with the oracle (e.g. hub data): no table at all
    assert component_rows({"sft": {"metrics": {"eval/loss": 1.0}}}, W) == []
