#!/usr/bin/env python3
"""Differential test: model.py vs `sagawatch replay`.

usage: python3 diff.py N SEED --bin PATH [--lifecycle] [--no-shrink]
Runs N random cases (gen.py, seeded) through the binary's `replay` and through model.py and
compares their lines. Each distinct divergence is shrunk and written to a directory of its
own (rules, inputs, cmd, binary.out, model.out), named in the output. Exit 1 if any case
differed.
"""
import copy
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
if os.environ.get('ORACLE_MODEL_DIR'):   # mutation testing of the harness itself
    sys.path.insert(0, os.environ['ORACLE_MODEL_DIR'])
import model  # noqa: E402
import gen    # noqa: E402

BIN = None
TIME_FIELDS = ('deadline', 'at', 'opened_at', 'time')
BASE_FIELDS = ('outcome', 'rule', 'key', 'step', 'deadline', 'within', 'at', 'opened_at', 'time')
EXTRA = {'alert': ('severity', 'summary', 'labels', 'description', 'sinks'),
         'compensate': ('sink', 'payload')}
WORK = tempfile.mkdtemp(prefix='sagawatch-oracle-')


def norm(d):
    o = {}
    for f in BASE_FIELDS + EXTRA.get(d.get('outcome'), ()):
        if f in d:
            v = d[f]
            if f in TIME_FIELDS and isinstance(v, str):
                p = model.parse_time(v)
                v = p if p is not None else v
            o[f] = v
    return json.dumps(o, sort_keys=True)


def write_case(case, d):
    os.makedirs(d, exist_ok=True)
    if any('_file' in r for r in case['rules']):
        rd = os.path.join(d, 'rules')
        os.makedirs(rd, exist_ok=True)
        files = {}
        for r in case['rules']:
            files.setdefault(r.get('_file', 'a.yaml'), []).append(r)
        for fn, rs in files.items():
            with open(os.path.join(rd, fn), 'w') as f:
                f.write(gen.rules_yaml(rs))
        if case.get('decoys'):
            with open(os.path.join(rd, '.#a.yaml'), 'w') as f:
                f.write('rules: [this is not valid\n')
            with open(os.path.join(rd, 'notes.txt'), 'w') as f:
                f.write('not rules\n')
            os.makedirs(os.path.join(rd, 'sub.yaml'), exist_ok=True)
            with open(os.path.join(rd, 'sub.yaml', 'x.yaml'), 'w') as f:
                f.write('rules: [bad\n')
        args = [BIN, 'replay', '--rules', rd]
    else:
        with open(os.path.join(d, 'rules.yaml'), 'w') as f:
            f.write(gen.rules_yaml(case['rules']))
        args = [BIN, 'replay', '--rules', os.path.join(d, 'rules.yaml')]
    if case.get('time_field'):
        args += ['--time-field', case['time_field']]
    if case.get('source_flag'):
        args += ['--source', case['inputs'][0][0]]
    if case.get('lateness'):
        args += ['--lateness', case['lateness']]
    if case.get('lifecycle'):
        args += ['--lifecycle']
    for i, (name, lines) in enumerate(case['inputs']):
        p = os.path.join(d, 'in%d.jsonl' % i)
        with open(p, 'w') as f:
            f.write(''.join(l + '\n' for l in lines))
        args.append('%s=%s' % (name, p) if name and not case.get('source_flag') else p)
    return args


def run_binary(case):
    d = tempfile.mkdtemp(dir=WORK)
    try:
        args = write_case(case, d)
        try:
            r = subprocess.run(args, capture_output=True, text=True, timeout=60)
        except subprocess.TimeoutExpired:
            return None, 'replay ran longer than 60 s'
        if r.returncode != 0:
            return None, 'exit %d: %s' % (r.returncode, r.stderr[-2000:])
        out = []
        for l in r.stdout.splitlines():
            if l.strip():
                try:
                    out.append(json.loads(l))
                except ValueError:
                    return None, 'not a JSON line: %r' % l[:200]
        return out, r.stderr
    finally:
        shutil.rmtree(d, ignore_errors=True)


def run_model(case):
    rules = model.load_rules(case['rules'])
    lat = model.parse_duration(case['lateness']) if case.get('lateness') else 0
    return model.replay(rules, case['inputs'], lat, time_field=case.get('time_field') or 'time',
                        lifecycle=case.get('lifecycle', False))


def compare(case):
    """Returns (status, bin_norm, model_norm, err): status in same|order|differ|error."""
    b, err = run_binary(case)
    if b is None:
        return 'error', None, None, err
    try:
        m = run_model(case)
    except Exception as e:  # model bug
        return 'modelerror', None, None, repr(e)
    bn = [norm(x) for x in b]
    mn = [norm(x) for x in m]
    if bn == mn:
        return 'same', bn, mn, err
    if Counter(bn) == Counter(mn):
        return 'order', bn, mn, err
    return 'differ', bn, mn, err


def signature(status, bn, mn):
    if status in ('error', 'modelerror'):
        return status
    cb, cm = Counter(bn), Counter(mn)
    extra_b = sorted(json.loads(x)['outcome'] for x in (cb - cm).elements())
    extra_m = sorted(json.loads(x)['outcome'] for x in (cm - cb).elements())
    if status == 'order':
        return 'order'
    # field-level signature when same count
    if len(bn) == len(mn):
        fields = set()
        for x, y in zip(bn, mn):
            if x != y:
                a, c = json.loads(x), json.loads(y)
                if a.get('outcome') != c.get('outcome'):
                    fields.add('outcome')
                else:
                    fields.update(k for k in set(a) | set(c) if a.get(k) != c.get(k))
        return 'fields:' + ','.join(sorted(fields))
    return 'bin+%s/model+%s' % ('.'.join(sorted(set(extra_b))), '.'.join(sorted(set(extra_m))))


# ------------------------------------------------------------------ shrinking

def fix_after(rule):
    names = {s['step'] for s in rule['expect']}
    for s in rule['expect']:
        if s.get('after') not in names:
            s.pop('after', None)


def candidates(case):
    # drop whole inputs' lines one by one, then rule-level simplifications
    for ii, (_, lines) in enumerate(case['inputs']):
        n = len(lines)
        chunk = n // 2
        while chunk >= 1:
            for start in range(0, n, chunk):
                c = copy.deepcopy(case)
                del c['inputs'][ii][1][start:start + chunk]
                yield c
            chunk //= 2
    if len(case['inputs']) > 1:
        for ii in range(len(case['inputs'])):
            c = copy.deepcopy(case)
            del c['inputs'][ii]
            yield c
    if len(case['rules']) > 1:
        for ri in range(len(case['rules'])):
            c = copy.deepcopy(case)
            del c['rules'][ri]
            yield c
    for ri, r in enumerate(case['rules']):
        if len(r['expect']) > 1:
            for si in range(len(r['expect'])):
                c = copy.deepcopy(case)
                del c['rules'][ri]['expect'][si]
                fix_after(c['rules'][ri])
                yield c
        for f in ('cancel', 'labels', 'on_missing', 'dedup', 'late'):
            if f in r:
                c = copy.deepcopy(case)
                del c['rules'][ri][f]
                yield c
        if r.get('on_missing'):
            c = copy.deepcopy(case)
            c['rules'][ri]['on_missing'] = []
            yield c
        for si, s in enumerate(r['expect']):
            for f in ('on_missing', 'source'):
                if f in s:
                    c = copy.deepcopy(case)
                    del c['rules'][ri]['expect'][si][f]
                    yield c
            if 'after' in s:
                c = copy.deepcopy(case)
                del c['rules'][ri]['expect'][si]['after']
                yield c
        if len(r.get('cancel', [])) > 1:
            for ci in range(len(r['cancel'])):
                c = copy.deepcopy(case)
                del c['rules'][ri]['cancel'][ci]
                yield c
    if case.get('lateness'):
        c = copy.deepcopy(case)
        c['lateness'] = None
        yield c


def shrink(case, sig):
    cur = case
    improved = True
    while improved:
        improved = False
        for c in candidates(cur):
            st, bn, mn, _ = compare(c)
            if st in ('same',):
                continue
            if signature(st, bn, mn) == sig:
                cur = c
                improved = True
                break
    return cur


def dump(case, d, bn=None, mn=None):
    if os.path.exists(d):
        shutil.rmtree(d)
    os.makedirs(d)
    args = write_case(case, d)
    with open(os.path.join(d, 'cmd'), 'w') as f:
        f.write(' '.join(args) + '\n')
    with open(os.path.join(d, 'case.json'), 'w') as f:
        json.dump(case, f, indent=1)
    try:
        r = subprocess.run(args, capture_output=True, text=True, timeout=60).stdout
    except subprocess.TimeoutExpired:
        r = '(replay ran longer than 60 s)\n'
    with open(os.path.join(d, 'binary.out'), 'w') as f:
        f.write(r)
    try:
        m = run_model(case)
        with open(os.path.join(d, 'model.out'), 'w') as f:
            for x in m:
                y = dict(x)
                for k in TIME_FIELDS:
                    if isinstance(y.get(k), int):
                        y[k] = model.format_time(y[k])
                f.write(json.dumps(y) + '\n')
    except Exception as e:
        with open(os.path.join(d, 'model.out'), 'w') as f:
            f.write(repr(e) + '\n')


def main():
    args = sys.argv[1:]
    global BIN
    lifecycle = '--lifecycle' in args
    do_shrink = '--no-shrink' not in args
    if '--bin' in args:
        BIN = args[args.index('--bin') + 1]
    if not BIN:
        sys.exit('usage: diff.py N SEED --bin PATH [--lifecycle] [--no-shrink]')
    pos = [a for a in args if not a.startswith('--') and a != BIN]
    n = int(pos[0]) if pos else 200
    seed = int(pos[1]) if len(pos) > 1 else 1
    rng = random.Random(seed)
    stats = Counter()
    seen = {}
    for i in range(n):
        case = gen.gen_case(rng)
        case['lifecycle'] = lifecycle
        st, bn, mn, err = compare(case)
        stats[st] += 1
        if st == 'same':
            continue
        sig = signature(st, bn, mn)
        if sig in seen:
            seen[sig][1] += 1
            continue
        print('case %d: %s  %s' % (i, st, sig), flush=True)
        if st == 'error' or st == 'modelerror':
            print('   ', err[:500])
            small = case
        else:
            small = shrink(case, sig) if do_shrink else case
        d = os.path.join(WORK, 'divergences', 'seed%d_case%d' % (seed, i))
        dump(small, d)
        seen[sig] = [d, 1]
    print('\nran %d cases: %s' % (n, dict(stats)))
    for sig, (d, cnt) in seen.items():
        print('  %-50s x%-4d %s' % (sig, cnt, d))
    if seen:
        sys.exit(1)
    shutil.rmtree(WORK, ignore_errors=True)


if __name__ == '__main__':
    main()
