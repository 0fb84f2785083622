"""Claims about `make results` (data/shapes/results.py): a stage that finished is not run again,
an interrupted run continues where it stopped, and the report averages the seeds."""
import json
import os
import sys

import pytest

from data.shapes import results as R


def test_a_finished_stage_is_not_run_again_and_a_failed_run_continues(tmp_path):
    count = lambda name: [sys.executable, '-c', f"open(r'{tmp_path / name}', 'a').write('x')"]
    fails = [sys.executable, '-c', 'import sys; sys.exit(3)']
    seen = []
    def depends(done):                        # a stage built from the earlier stages' stamps
        seen.append(sorted(done))
        return count('c')
    out = str(tmp_path / 'out')
    with pytest.raises(SystemExit, match=r'stage b failed \(exit 3\).*logs/b.log'):
        R.run(out, only=[('a', count('a')), ('b', fails), ('c', depends)])
    assert (tmp_path / 'a').read_text() == 'x' and not (tmp_path / 'c').exists()
    done = R.run(out, only=[('a', count('a')), ('b', count('b')), ('c', depends)])
    assert [(tmp_path / n).read_text() for n in 'abc'] == ['x', 'x', 'x']    # a ran once
    assert seen == [['a', 'b']] and set(done) == {'a', 'b', 'c'}
    assert json.load(open(tmp_path / 'out' / 'stamps' / 'a.json'))['seconds'] >= 0
    preempted = [sys.executable, '-c', 'import sys; sys.exit(75)']
    with pytest.raises(SystemExit, match='stage d was stopped by a signal.*continues'):
        R.run(out, only=[('a', count('a')), ('d', preempted)])


def test_an_interrupted_stage_counts_the_time_of_each_of_its_runs(tmp_path):
    out = str(tmp_path / 'out')
    sleep_then = lambda code: [sys.executable, '-c', f'import sys, time; time.sleep(0.5); '
                                                     f'sys.exit({code})']
    with pytest.raises(SystemExit, match='stopped by a signal'):
        R.run(out, only=[('a', sleep_then(75))])
    done = R.run(out, only=[('a', sleep_then(0))])
    assert done['a']['seconds'] >= 1.0                      # both runs of half a second
    assert not os.path.exists(tmp_path / 'out' / 'stamps' / 'a.json.partial')


def test_the_plain_dit_gets_the_priors_training_time_in_iterations():
    done = {'dit_none_s0': dict(seconds=2400.0), 'prior': dict(seconds=600.0)}
    assert R.plus_iters(done) == 30000                         # 10 it/s for 600 s more


def test_the_report_gives_the_mean_and_half_the_range_over_the_seeds(tmp_path):
    out = tmp_path / 'out'
    keys = ['valid', 'tv_shape', 'tv_color', 'tv_background', 'tv_size', 'tv_joint', 'coverage',
            'nearest', 'from_sources', 'novel', 'unseen_pair', 'kept', 'shape_kept', 'color_kept']
    modes = {'uncond': 'uncond', 'plain': 'plain', 'class': 'class', 'compose2': 'compose',
             'compose3': 'compose', 'compose2_soft': 'compose', 'compose3_soft': 'compose',
             'ceiling': 'recon', 'plain_plus': 'plain', 'plain_plus_raw': 'plain', 'real_val': 'real',
             'uncond_cfg1': 'uncond', 'class_cfg1': 'class', 'text_val': 'text',
             'text_seen': 'text', 'text_ood': 'text', 'text_held': 'text',
             'oracle_ceiling': 'recon', 'oracle_compose2': 'compose', 'oracle_text_seen': 'text',
             'oracle_text_held': 'text'}
    for stage, mode in modes.items():
        for seed in (0, 1):
            name = stage if stage == 'real_val' else f'{stage}_s{seed}'
            os.makedirs(out / 'samples' / name, exist_ok=True)
            value = 0.4 + 0.2 * seed if stage in ('uncond', 'text_seen', 'oracle_ceiling') else 0.5
            scores = {mode: {k: value for k in keys}}
            json.dump(scores, open(out / 'samples' / name / 'scores.json', 'w'))
    done = {'prior': dict(seconds=600.0, command=f'{sys.executable} prior.py --seed=0'),
            'dit_none_s0': dict(seconds=3000.0, command='python diffusion.py')}
    done.update({f'oracle_text_held_s{s}': dict(seconds=0.0, command='python sample.py')
                 for s in (0, 1)})
    os.makedirs(out / 'oracle')
    json.dump(dict(share=[[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0.9, 0], [0, 0, 0, 0.7]],
                   alone=[1, 1, 1, 1], shape_not_color=1), open(out / 'oracle' /
                                                                'factorization.json', 'w'))
    R.report(done, str(out), str(tmp_path / 'results.md'), str(tmp_path / 'assets'))
    text = (tmp_path / 'results.md').read_text()
    uncond = next(l for l in text.splitlines() if l.startswith('| prior -> DLC -> DiT'))
    assert uncond.count('0.500 ± 0.100') == 8                   # every column of the table
    assert "| the prior's samples (uncond) | 0.500 ± 0.100 |" in text
    assert '1.0 hours' in text
    assert ("| recon of the ood split's oracle codes (the DiT's ceiling) | 0.500 ± 0.100 | "
            "0.500 ± 0.100 | 0.500 ± 0.100 | 0.500 ± 0.100 |") in text
    assert '| oracle | 1.00, 1 | 1.00, 1 | 0.90, 1 | 0.70, 1 | 1 |' in text
    assert ('| "a red square": the 14 seen (shape, color) pairs | 0.500 ± 0.100 | 0.500 ± 0.100 | '
            '0.500 ± 0.100 | 0.500 ± 0.100 |') in text
    assert '| real images: the val split (held out of training) | 0.500 |' in text
    # uncond's seeds (0.4, 0.6) straddle every baseline's 0.5: the difference is 0, not apart
    assert '| valid | +0.000 | no | +0.000 | no | +0.000 | no |' in text
    assert '24,000 + 4,800 iterations' in text                  # 8 it/s for the prior's 600 s
    assert "(the stages' commits:\nnot recorded for 4)" in text       # stamps without a commit
    assert '# prior: 10.0 min\npython prior.py --seed=0' in text
    # the oracle stages run alone are spliced into that report, in place of their section
    R.splice(R.ORACLE_TITLE + '\n\nnew numbers', str(tmp_path / 'results.md'))
    again = (tmp_path / 'results.md').read_text()
    assert again.count(R.ORACLE_TITLE) == 1 and 'new numbers\n\n## The commands' in again
    assert again.split(R.ORACLE_TITLE)[0] == text.split(R.ORACLE_TITLE)[0]
    assert again.split('## The commands')[1] == text.split('## The commands')[1]


def test_the_plain_dit_given_the_time_is_compared_with_its_better_weights(tmp_path):
    out = tmp_path / 'out'
    for ema, raw, chosen in [(0.0, 0.9, 'plain_plus_raw'), (0.96, 0.03, 'plain_plus')]:
        for name, valid in [('plain_plus_s0', ema), ('plain_plus_raw_s0', raw)]:
            os.makedirs(out / 'samples' / name, exist_ok=True)
            json.dump({'plain': {'valid': valid}}, open(out / 'samples' / name / 'scores.json', 'w'))
        assert R.plus_weights(str(out)) == chosen


def test_a_stamp_names_the_commit_its_stage_ran_at(tmp_path):
    done = R.run(str(tmp_path / 'out'), only=[('a', [sys.executable, '-c', 'pass'])])
    assert done['a']['commit'] == R.git_commit() != ''


def test_the_text_stages_prompt_each_seen_and_each_held_out_pair_once():
    seen, held = R.short_prompts()
    seen, held = seen.split('|'), held.split('|')
    assert len(seen) == 14 and len(held) == 4 and not set(seen) & set(held)
    assert 'a blue circle' in held and 'a red square' in seen      # prepare.py's held_out
    names = [name for name, _ in R.stages('out')]
    for seed in R.SEEDS:               # the text model trains before its four prompt sets
        at = names.index(f'text2dlc_s{seed}')
        assert [names.index(f'text_{k}_s{seed}') for k in ('val', 'seen', 'ood', 'held')] == \
            list(range(at + 1, at + 5)) and names.index(f'dit_dlc_s{seed}') < at


def test_a_difference_exceeds_the_spread_only_when_the_seeds_ranges_are_apart():
    assert R.separated([0.90, 0.93], [0.69, 0.71])
    assert R.separated([0.5], [0.6, 0.7])
    assert not R.separated([0.90, 0.70], [0.69, 0.71])          # means differ, ranges overlap
    assert not R.separated([0.5, 0.5], [0.5])
