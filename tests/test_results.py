"""Claims about `make results` (data/shapes/results.py): a stage that finished is not run again,
an interrupted run continues where it stopped, the seeds' stages run in lanes side by side, the
report averages the seeds, and each claim's verdict is computed from its numbers."""
import json
import os
import re
import sys
import time

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


def stage(tmp_path, name, seconds=0.0, code=0, wait_for=None):
    """A fake stage's command: it counts its runs in <name>.runs, waits for the file wait_for,
    sleeps, writes when it started and ended and the threads it was given to <name>.json, then
    exits with code."""
    return [sys.executable, '-c', f"""
import json, os, sys, time
start = time.time()
open({str(tmp_path / name)!r} + '.runs', 'a').write('x')
while {wait_for!r} and not os.path.exists({wait_for!r}):
    time.sleep(0.02)
time.sleep({seconds})
json.dump(dict(start=start, end=time.time(), omp=os.environ.get('OMP_NUM_THREADS'),
               mkl=os.environ.get('MKL_NUM_THREADS')),
          open({str(tmp_path / name)!r} + '.json', 'w'))
sys.exit({code})
"""]


def test_the_seeds_stages_run_in_lanes_side_by_side_on_one_thread_after_the_shared_ones(
        tmp_path, monkeypatch):
    monkeypatch.setenv('OMP_NUM_THREADS', '2')          # what the shared stages are left with
    names = ['one', 'two', 'a_s0', 'a_s1', 'b_s0', 'b_s1']
    out = str(tmp_path / 'out')
    done = R.run(out, only=[(n, stage(tmp_path, n, 0.8 if '_s' in n else 0.0)) for n in names])
    ran = {n: json.load(open(tmp_path / f'{n}.json')) for n in names}
    assert list(done) == names                          # the report's order: the stage list's
    assert ran['one']['end'] <= ran['two']['start']
    assert ran['two']['end'] <= min(ran[n]['start'] for n in names[2:])
    for a, b in [('a_s0', 'a_s1'), ('b_s0', 'b_s1')]:   # seed 0's stage while seed 1's runs
        assert ran[a]['start'] < ran[b]['end'] and ran[b]['start'] < ran[a]['end']
    for seed in (0, 1):                                 # a lane's stages in turn
        assert ran[f'a_s{seed}']['end'] <= ran[f'b_s{seed}']['start']
    assert all(ran[n]['omp'] == ran[n]['mkl'] == '1' for n in names[2:])
    assert ran['one']['omp'] == '2' and ran['one']['mkl'] is None
    runs = json.load(open(tmp_path / 'out' / 'stamps' / '_runs.json'))
    assert [(r['lanes'], r['threads_per_lane']) for r in runs] == [(2, 1)]
    assert runs[0]['seconds'] < sum(stamp['seconds'] for stamp in done.values())


def test_not_parallel_runs_one_stage_at_a_time_in_the_stage_lists_order(tmp_path, monkeypatch):
    monkeypatch.setenv('OMP_NUM_THREADS', '2')
    names = ['one', 'a_s0', 'b_s0', 'a_s1', 'b_s1']
    out = str(tmp_path / 'out')
    R.run(out, only=[(n, stage(tmp_path, n, 0.2)) for n in names], parallel=False)
    ran = [json.load(open(tmp_path / f'{n}.json')) for n in names]
    assert all(a['end'] <= b['start'] for a, b in zip(ran, ran[1:]))
    assert all(r['omp'] == '2' and r['mkl'] is None for r in ran)      # the default threads
    runs = json.load(open(tmp_path / 'out' / 'stamps' / '_runs.json'))
    assert [(r['lanes'], r['threads_per_lane']) for r in runs] == [(1, None)]


def test_a_failed_stage_stops_the_other_lane_keeps_what_finished_and_a_rerun_does_the_rest(
        tmp_path):
    out = str(tmp_path / 'out')
    runs = lambda n: (tmp_path / f'{n}.runs').read_text() if (tmp_path / f'{n}.runs').exists() \
        else ''
    plan = lambda failing: [
        ('one', stage(tmp_path, 'one')),
        ('a_s0', stage(tmp_path, 'a_s0')),
        ('b_s0', stage(tmp_path, 'b_s0', 60.0 if failing else 0.0)),
        ('c_s0', stage(tmp_path, 'c_s0')),
        # seed 1's first stage fails while seed 0's second runs
        ('a_s1', stage(tmp_path, 'a_s1', code=3 if failing else 0,
                       wait_for=str(tmp_path / 'b_s0.runs') if failing else None)),
        ('b_s1', stage(tmp_path, 'b_s1'))]
    t0 = time.time()
    with pytest.raises(SystemExit) as failed:
        R.run(out, only=plan(failing=True))
    assert time.time() - t0 < 30                        # b_s0's minute was cut short
    first, *others = str(failed.value).splitlines()
    assert re.fullmatch(r'stage a_s1 failed \(exit 3\); see .*/out/logs/a_s1\.log, .*', first)
    assert len(others) == 1 and re.fullmatch(r'stage b_s0 stopped .* it continues', others[0])
    stamps = tmp_path / 'out' / 'stamps'
    assert sorted(p.name for p in stamps.iterdir()) == [
        '_runs.json', 'a_s0.json', 'a_s1.json.partial', 'b_s0.json.partial', 'one.json']
    assert [runs(n) for n in ('c_s0', 'b_s1')] == ['', '']     # no stage started after
    done = R.run(out, only=plan(failing=False))
    assert list(done) == [n for n, _ in plan(False)]
    assert [runs(n) for n in ('one', 'a_s0', 'b_s0', 'c_s0', 'a_s1', 'b_s1')] == \
        ['x', 'x', 'xx', 'x', 'xx', 'x']                # what finished ran once
    assert len(json.load(open(stamps / '_runs.json'))) == 2


def test_the_shared_stages_come_first_and_each_seeds_stages_make_its_lane():
    names = lambda plan: [name for name, _ in plan]
    plan = R.stages('out')
    shared, (lane0, lane1) = R.lanes(plan)
    assert names(shared) == ['tokenizer', 'dump', 'probe', 'codes_report', 'prior', 'real_val',
                             'oracle_codes', 'oracle_report']
    assert all(n.endswith('_s0') for n in names(lane0))
    assert all(n.endswith('_s1') for n in names(lane1))
    # one stage at a time runs them in the same order: the shared stages, seed 0's, seed 1's
    assert names(shared) + names(lane0) + names(lane1) == names(plan)
    # the plain DiT given the prior's time reads the stamps of the prior (shared) and of seed 0's
    # plain DiT, before it in its lane
    lane0 = names(lane0)
    assert lane0.index('dit_none_s0') < lane0.index('dit_none_plus_s0') < \
        lane0.index('plain_plus_s0') < lane0.index('plain_plus_raw_s0')
    assert len(lane0) == len(lane1) + 3


def test_the_plain_dit_gets_the_priors_training_time_in_iterations():
    done = {'dit_none_s0': dict(seconds=1000.0), 'prior': dict(seconds=600.0)}
    assert R.plus_iters(done, base=12000) == 19200             # 12 it/s for 600 s more
    assert R.plus_iters(done) == R.DIT_ITERS * 8 // 5           # the config's iterations


KEYS = ['valid', 'tv_shape', 'tv_color', 'tv_background', 'tv_size', 'tv_joint', 'coverage',
        'nearest', 'from_sources', 'novel', 'unseen_pair', 'kept', 'shape_kept', 'color_kept']
MODES = {'uncond': 'uncond', 'plain': 'plain', 'class': 'class', 'compose2': 'compose',
         'compose3': 'compose', 'compose2_soft': 'compose', 'compose3_soft': 'compose',
         'ceiling': 'recon', 'plain_plus': 'plain', 'plain_plus_raw': 'plain', 'real_val': 'real',
         'uncond_cfg1': 'uncond', 'class_cfg1': 'class', 'text_val': 'text',
         'text_seen': 'text', 'text_ood': 'text', 'text_held': 'text',
         'oracle_ceiling': 'recon', 'oracle_compose2': 'compose', 'oracle_text_seen': 'text',
         'oracle_text_held': 'text'}


def fake_run(out, value):
    """An out-results folder whose every score is value(stage, seed)."""
    for stage, mode in MODES.items():
        for seed in (0, 1):
            name = stage if stage == 'real_val' else f'{stage}_s{seed}'
            os.makedirs(out / 'samples' / name, exist_ok=True)
            scores = {mode: {k: value(stage, seed) for k in KEYS}}
            json.dump(scores, open(out / 'samples' / name / 'scores.json', 'w'))
    os.makedirs(out / 'oracle', exist_ok=True)
    json.dump(dict(share=[[1.0, 0, 0, 0], [0, 1.0, 0, 0], [0, 0, 0.9, 0], [0, 0, 0, 0.7]],
                   alone=[1, 1, 1, 1], shape_not_color=1), open(out / 'oracle' /
                                                                'factorization.json', 'w'))
    done = {'prior': dict(seconds=600.0, command=f'{sys.executable} prior.py --seed=0'),
            'dit_none_s0': dict(seconds=3000.0, command='python diffusion.py')}
    done.update({f'oracle_text_held_s{s}': dict(seconds=0.0, command='python sample.py')
                 for s in (0, 1)})
    return R.collect(done, str(out))


def test_the_report_gives_the_mean_and_half_the_range_over_the_seeds(tmp_path):
    res = fake_run(tmp_path / 'out', lambda stage, seed: 0.4 + 0.2 * seed
                   if stage in ('uncond', 'text_seen', 'oracle_ceiling') else 0.5)
    text = R.render(json.loads(json.dumps(res)))         # what docs/results.json gives back
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
    extra = R.DIT_ITERS * 600 // 3000                           # its it/s for the prior's 600 s
    assert f'{R.DIT_ITERS:,} + {extra:,} iterations' in text
    assert "The stages' commits: not recorded for 4." in text   # stamps without a commit
    assert '# prior: 10.0 min\npython prior.py --seed=0' in text


def test_the_report_gives_the_runs_wall_time_beside_the_stages_time(tmp_path):
    res = fake_run(tmp_path / 'out', lambda stage, seed: 0.5)     # 1.0 hours of stages
    assert 'wall time of the run' not in R.render(res)             # a report from before
    laned = dict(lanes=2, threads_per_lane=1)
    res['runs'] = [dict(laned, seconds=1800.0), dict(laned, seconds=360.0)]  # an interrupted run
    text = R.render(json.loads(json.dumps(res)))
    assert ("The wall time of the run: 0.6 hours for those 1.0 hours of stages (2 runs of "
            "results.py, a resumed run counting each): the shared stages first, then each seed's "
            "stages in a lane of its own, the 2 lanes side by side, each lane's processes on one "
            "thread.\n") in text
    res['runs'].append(dict(lanes=1, threads_per_lane=None, seconds=1440.0))
    text = R.render(res)
    assert '1.0 hours for those 1.0 hours of stages (3 runs' in text
    assert "in 2 of the runs, the shared stages first" in text
    assert 'one thread; in 1 of the runs, one stage at a time.' in text


def test_a_merged_report_counts_each_run_once():
    """The oracle stages run again in the same folder: its runs include the earlier report's."""
    first, second = dict(seconds=1.0, lanes=2), dict(seconds=2.0, lanes=2)
    empty = dict(stages={}, scores={}, factorization={})
    res = R.merge(dict(empty, runs=[first]), dict(empty, runs=[first, second]))
    assert res['runs'] == [first, second]
    assert 'runs' not in R.merge(dict(empty), dict(empty, runs=[second]))   # not recorded before


def verdicts(text):
    return [line for line in text.splitlines() if 'Verdict' in line or line.startswith('- ')
            or line.startswith('  **')]


def test_each_claims_verdict_follows_its_numbers(tmp_path):
    """The same report says yes where the numbers pass a claim's test and no where they fail."""
    good = {'uncond': 0.1, 'plain': 0.5, 'plain_plus': 0.5, 'plain_plus_raw': 0.5, 'class': 0.5,
            'compose2': 0.3, 'text_held': 0.4, 'text_seen': 0.6, 'oracle_ceiling': 0.9,
            'oracle_compose2': 0.3, 'oracle_text_held': 0.4, 'oracle_text_seen': 0.6}
    # uncond is the pipeline (its joint TV) and the prior's held-out rate (below composition)
    text = R.render(fake_run(tmp_path / 'good', lambda stage, seed: good.get(stage, 0.2)))
    assert [v.count('**yes**') for v in verdicts(text) if '**' in v] == [2, 1, 1, 1, 1, 1]
    # uncond worse than every DiT, the oracle's composition the one claim still above the prior
    bad = dict(good, uncond=0.6, compose2=0.05, text_held=0.2, oracle_ceiling=0.8,
               oracle_compose2=0.7, oracle_text_held=0.1)
    text = R.render(fake_run(tmp_path / 'bad', lambda stage, seed: bad.get(stage, 0.2)))
    assert [v.count('**no**') for v in verdicts(text) if '**' in v] == [2, 1, 1, 1, 0, 1]
    # a difference inside the seed spread is not enough
    text = R.render(fake_run(tmp_path / 'spread', lambda stage, seed: [0.05, 0.2][seed]
                             if stage == 'compose2' else good.get(stage, 0.2)))
    assert "composed codes show a held-out pair more often than the prior's samples, by more " \
           "than the seed spread: **no** (0.125 ± 0.075 against 0.100" in text.replace('\n', ' ')


def test_an_earlier_report_takes_the_stages_run_again_in_the_stage_order(tmp_path):
    earlier = dict(stages={'prior': dict(seconds=1.0), 'dit_oracle_s0': dict(seconds=1.0)},
                   scores={'uncond_s0': 1, 'oracle_ceiling_s0': 1}, factorization={'tok': 1})
    again = dict(stages={'oracle_codes': dict(seconds=2.0), 'dit_oracle_s0': dict(seconds=2.0)},
                 scores={'oracle_ceiling_s0': 2}, factorization={'oracle': 2})
    res = R.merge(earlier, again)
    assert list(res['stages']) == ['prior', 'oracle_codes', 'dit_oracle_s0']
    assert res['stages']['dit_oracle_s0']['seconds'] == 2.0
    assert res['scores'] == {'uncond_s0': 1, 'oracle_ceiling_s0': 2}
    assert res['factorization'] == {'tok': 1, 'oracle': 2}


def test_the_plain_dit_given_the_time_is_compared_with_its_better_weights():
    for ema, raw, chosen in [(0.0, 0.9, 'plain_plus_raw'), (0.96, 0.03, 'plain_plus')]:
        res = dict(scores={'plain_plus_s0': {'plain': {'valid': ema}},
                           'plain_plus_raw_s0': {'plain': {'valid': raw}}})
        assert R.plus_weights(res) == chosen


def test_the_committed_report_is_drawn_from_the_committed_results():
    """docs/results.md is what docs/results.json renders to: no number edited by hand."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    with open(os.path.join(root, 'docs', 'results.json')) as f:
        res = json.load(f)
    with open(os.path.join(root, 'docs', 'results.md')) as f:
        assert f.read() == R.render(res)


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


def test_the_readmes_measured_claims_are_the_reports_numbers():
    """Every 'mean ± spread' the README quotes is one of docs/results.md's: one source."""
    import re
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    read = lambda *p: open(os.path.join(root, *p)).read()
    pattern = r'\d+\.\d{3} ± \d+\.\d{3}'
    quoted = set(re.findall(pattern, read('README.md')))
    assert len(quoted) >= 10
    assert quoted <= set(re.findall(pattern, read('docs', 'results.md')))
