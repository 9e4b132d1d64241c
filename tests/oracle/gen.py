#!/usr/bin/env python3
"""Random workload generator for the sagawatch differential test.

A case is a dict:
  rules:    list of rule dicts (written as YAML with JSON flow values)
  inputs:   list of (source name or None, [lines])
  lateness: duration string or None
"""
import json
import random

BASE = 1767225600  # 2026-01-01T00:00:00Z in seconds

WITHINS = ['500ms', '1s', '2s', '5s', '10s', '15s', '30s', '1m', '90s', '1m30s', '2m', '5m']
WINDOWS = ['1s', '5s', '10s', '30s', '1m', '2m', '5m', '10m']
LATENESS = ['500ms', '1s', '5s', '10s', '30s', '1m']
TYPES = ['A', 'B', 'C', 'D', 'X']


def dur_ns(s):
    from model import parse_duration
    return parse_duration(s)


def fmt_time(ms, rng):
    """Render an absolute ms offset as RFC 3339 in a few equivalent spellings."""
    import model
    ns = (BASE * 1000 + ms) * 10**6
    s = model.format_time(ns)
    r = rng.random()
    if r < 0.08:
        # +01:00 offset spelling
        ns2 = ns + 3600 * 10**9
        t = model.format_time(ns2)[:-1]
        return t + '+01:00'
    if r < 0.14 and '.' not in s:
        return s[:-1] + '.000Z'
    if r < 0.18 and '.' in s:
        # 9-digit fraction
        head, frac = s[:-1].split('.')
        return head + '.' + (frac + '000000000')[:9] + 'Z'
    return s


def gen_rule(rng, ri, types, keypaths, sources):
    name = 'r%d' % ri
    nsteps = rng.randint(1, 4)
    trig_type = rng.choice(types)
    trig = {'where': {'type': trig_type}, 'key': rng.choice(keypaths[:2])}
    if rng.random() < 0.15:
        trig['where']['n'] = 1
    if sources and rng.random() < 0.3:
        trig['source'] = rng.choice(sources)
    if rng.random() < 0.05:
        del trig['where']
    steps = []
    perm = list(range(nsteps))
    rng.shuffle(perm)
    after = {}
    for p in range(1, nsteps):
        if rng.random() < 0.55:
            after[perm[p]] = perm[rng.randrange(p)]
    for i in range(nsteps):
        st = {'step': 's%d' % i}
        if sources and rng.random() < 0.2:
            st['source'] = rng.choice(sources)
        w = {'type': rng.choice(types)}
        if rng.random() < 0.2:
            w['ok'] = True
        if rng.random() < 0.05:
            w = {}
        if w:
            st['where'] = w
        st['key'] = rng.choice(keypaths)
        if i in after:
            st['after'] = 's%d' % after[i]
        st['within'] = rng.choice(WITHINS)
        if rng.random() < 0.15:
            st['on_missing'] = rng.choice([[], [{'alert': {'summary': 'own {{step}} {{key}}'}}],
                                           [{'compensate': {'sink': 'k', 'payload': {'s': '{{step}}', 'n': 1}}}]])
        steps.append(st)
    rule = {'name': name, 'trigger': trig, 'expect': steps}
    if rng.random() < 0.45:
        cancels = []
        for _ in range(rng.randint(1, 2)):
            c = {'where': {'type': rng.choice(['X', 'X', rng.choice(types)])}, 'key': rng.choice(keypaths)}
            if sources and rng.random() < 0.2:
                c['source'] = rng.choice(sources)
            cancels.append(c)
        rule['cancel'] = cancels
    r = rng.random()
    if r < 0.3:
        rule['on_missing'] = []
    elif r < 0.85:
        acts = []
        if rng.random() < 0.8:
            al = {'summary': rng.choice([
                '{{rule}}|{{key}}|{{step}}|{{within}}|{{deadline}}|{{trigger.v}}',
                'missing {{step}} for {{key}}', '{{trigger.data.id}} {{trigger.nope}}'])}
            if rng.random() < 0.6:
                al['severity'] = rng.choice(['critical', 'info', '{{trigger.sev}}'])
            if rng.random() < 0.3:
                al['description'] = 'd {{deadline}}'
            if rng.random() < 0.2:
                al['labels'] = {'team': 't{{key}}'}
            if rng.random() < 0.1:
                al['sinks'] = ['stdout']
            acts.append({'alert': al})
        if rng.random() < 0.5:
            acts.append({'compensate': {'sink': 'cmds', 'payload': {
                'type': 'Undo', 'key': '{{key}}', 'why': '{{step}} after {{within}}',
                'list': ['{{rule}}', 3, True, None], 'v': '{{trigger.v}}'}}})
        rng.shuffle(acts)
        rule['on_missing'] = acts
    # else: absent
    if rng.random() < 0.2:
        rule['labels'] = {'src': '{{trigger.v}}', 'team': 'base'}
    if rng.random() < 0.8:
        rule['dedup'] = rng.choice(WINDOWS)
    if rng.random() < 0.8:
        rule['late'] = rng.choice(WINDOWS)
    return rule


GOOD_KEYS = ['1', '2', '3', 'a', 'b', 1, 2, 3, '01', 7, '7', '-7', -7]
BAD_KEYS = ['', '__RAW_4.5__', True, None, '__RAW_-0__', '__RAW_7.0__', [1], {'x': 1}, '__RAW_1e1__',
            '__ABSENT__']
VVALUES = ['web', 3, True, None, '__RAW_2.5__', {'a': 1}, '', '__ABSENT__', [1, 'x']]


WILD_KEYS = ['10', '9', 10, 9, 'é', 'Z', 'z', 'a b', 'k' * 1024, 'k' * 1025, 'ü' * 512, 'ü' * 513,
             '__RAW_18446744073709551615__', '__RAW_-9223372036854775808__', '__RAW_18446744073709551616__',
             '__RAW_007__', '\uffff', '\U0001F600', 'Ω']
WILD_WHERE = [{'tag': None}, {'arr': [1, 'x']}, {'obj': {'a': 1}}, {'arr.0': 1}, {'obj.a': 1.0},
              {'deep.x.y': 'z'}]
WILD_FIELDS = [('tag', None), ('arr', [1, 'x']), ('arr', ['__RAW_1.0__', 'x']), ('arr', [1]),
               ('obj', {'a': 1}), ('obj', {'a': 1, 'b': 2}), ('obj', {'a': '__RAW_1.0__'}),
               ('deep', {'x': {'y': 'z'}}), ('deep', {'x': ['z']}), ('tag', 'null')]


def gen_case(rng, wild=None):
    if wild is None:
        import os
        wild = True if os.environ.get('WILD') == '1' else rng.random() < 0.35
    nin = 1
    sources = []
    if rng.random() < 0.25:
        nin = rng.randint(2, 3)
        sources = ['s%d' % i for i in range(nin)]
    elif rng.random() < 0.1:
        sources = ['s0']   # one input given --source / NAME=FILE
    keypaths = rng.choice([['id', 'id', 'ref'], ['id', 'ref', 'data.id'], ['id', 'id', 'id']])
    ntypes = rng.randint(2, 5)
    types = TYPES[:ntypes]
    rules = [gen_rule(rng, i, types, keypaths, sources) for i in range(rng.choice([1, 1, 2, 2, 3]))]
    lateness = None
    if rng.random() < 0.3:
        lateness = rng.choice(LATENESS)
    churn = rng.random() < 0.15
    keys = rng.sample(GOOD_KEYS + (WILD_KEYS if wild else []), rng.randint(1, 5))
    if churn:
        # heavy reuse of one or two keys over a long stream: reopen, stale timers, late vs dedup
        keys = keys[:rng.randint(1, 2)]
        rules = rules[:rng.randint(1, 2)]
        for r in rules:
            r['dedup'] = rng.choice(['500ms', '1s', '2s', '5s', '30s'])
            r['late'] = rng.choice(['500ms', '1s', '5s', '30s', '1m', '5m'])
    if wild:
        for r in rules:
            for m in [r['trigger']] + r['expect'] + r.get('cancel', []):
                if rng.random() < 0.15:
                    m.setdefault('where', {}).update(rng.choice(WILD_WHERE))
    maxw = max(dur_ns(s['within']) for r in rules for s in r['expect']) // 10**6
    # grid: coarse so boundaries collide
    grid = rng.choice([500, 1000, 1000, 5000])
    span = max(grid * 4, int(maxw * rng.uniform(1.0, 4.0)))
    span = min(span, 20 * 60 * 1000)
    if churn:
        span = max(span, 10 * maxw)
    nev = rng.randint(60, 300) if churn else rng.randint(3, 40) if not (wild and rng.random() < 0.3) else rng.randint(40, 150)
    evs = []
    alltypes = list(dict.fromkeys(types + ['X', 'Other']))
    for _ in range(nev):
        t = rng.randrange(0, span // grid + 1) * grid
        if rng.random() < 0.05:
            t += rng.randrange(1, grid)
        ev = {'type': rng.choice(alltypes)}
        k = rng.choice(keys) if rng.random() > 0.07 else rng.choice(BAD_KEYS)
        for kp in keypaths:
            kk = k if rng.random() < 0.85 else rng.choice(keys)
            if kk == '__ABSENT__':
                continue
            if kp == 'data.id':
                ev.setdefault('data', {})['id'] = kk
            else:
                ev[kp] = kk
        if rng.random() < 0.3:
            ev['ok'] = rng.choice([True, True, False, 1])
        if rng.random() < 0.2:
            ev['n'] = rng.choice([1, '__RAW_1.0__', '1'])
        v = rng.choice(VVALUES)
        if v != '__ABSENT__':
            ev['v'] = v
        if rng.random() < 0.3:
            ev['sev'] = rng.choice(['page', '', 'info'])
        if wild and rng.random() < 0.3:
            f, v = rng.choice(WILD_FIELDS)
            ev[f] = v
        evs.append([t, ev])
    evs.sort(key=lambda x: x[0])
    # perturb order
    if rng.random() < 0.6:
        for _ in range(rng.randint(1, max(1, nev // 3))):
            i = rng.randrange(len(evs))
            j = max(0, min(len(evs) - 1, i + rng.randint(-6, 6)))
            evs.insert(j, evs.pop(i))
    # duplicates
    if rng.random() < 0.4:
        for _ in range(rng.randint(1, 4)):
            i = rng.randrange(len(evs))
            j = rng.randrange(i, len(evs) + 1)
            evs.insert(j, [evs[i][0], dict(evs[i][1])])

    time_field = None
    if wild and rng.random() < 0.2:
        time_field = rng.choice(['meta.ts', 'ts'])

    def line(t, ev):
        if time_field == 'meta.ts':
            d = {'meta': {'ts': fmt_time(t, rng)}, 'time': 'garbage'}
        elif time_field == 'ts':
            d = {'ts': fmt_time(t, rng)}
        else:
            d = {'time': fmt_time(t, rng)}
        d.update(ev)
        s = json.dumps(d, ensure_ascii=rng.random() < 0.5)
        for raw in ('4.5', '-0', '7.0', '1e1', '2.5', '1.0', '18446744073709551615', '-9223372036854775808',
                    '18446744073709551616', '007'):
            s = s.replace('"__RAW_%s__"' % raw, raw)
        return s

    lines_by_input = [[] for _ in range(nin)]
    for t, ev in evs:
        i = rng.randrange(nin)
        lines_by_input[i].append(line(t, ev))
    # a few bad lines
    if rng.random() < 0.15:
        lines_by_input[0].insert(rng.randrange(len(lines_by_input[0]) + 1),
                                 rng.choice(['not json', '[1,2]', '{"type":"A","id":"1"}',
                                             '{"time": 5, "type": "A"}', '',
                                             '{"time":"2026-01-01 00:00:00","type":"A"}']))
    if nin > 1:
        inputs = [(sources[i], lines_by_input[i]) for i in range(nin)]
    elif sources:
        inputs = [(sources[0], lines_by_input[0])]
    else:
        inputs = [(None, lines_by_input[0])]
    case = {'rules': rules, 'inputs': inputs, 'lateness': lateness, 'time_field': time_field}
    if len(inputs) == 1 and inputs[0][0] and rng.random() < 0.5:
        case['source_flag'] = True
    if wild and rng.random() < 0.4:
        names = ['b.yaml', 'a.yml', 'c.yaml', 'z.yml', '0.yaml']
        for r in rules:
            r['_file'] = rng.choice(names)
        rules.sort(key=lambda r: r['_file'])
        case['decoys'] = rng.random() < 0.5
    return case


def rules_yaml(rules):
    out = ['rules:']
    for r in rules:
        first = True
        for k, v in r.items():
            if k.startswith('_'):
                continue
            out.append(('  - ' if first else '    ') + '%s: %s' % (k, json.dumps(v)))
            first = False
    return '\n'.join(out) + '\n'
