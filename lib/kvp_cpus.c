#include "kvp_cpus.h"

#include <dirent.h>
#include <errno.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>

static int parse(const char *s, cpu_set_t *set) {
    CPU_ZERO(set);
    while (*s) {
        char *end;
        long a = strtol(s, &end, 10), b = a;
        if (end == s || a < 0 || a >= CPU_SETSIZE) return -1;
        s = end;
        if (*s == '-') {
            b = strtol(s + 1, &end, 10);
            if (end == s + 1 || b < a || b >= CPU_SETSIZE) return -1;
            s = end;
        }
        for (long c = a; c <= b; c++)
            CPU_SET((int)c, set);
        if (*s == ',' && s[1])
            s++;
        else if (*s)
            return -1;
    }
    return CPU_COUNT(set) ? 0 : -1;
}

int kvp_cpus_check(const char *list, kvp_err_t *err) {
    cpu_set_t set;
    if (parse(list, &set))
        return kvp_err_set(err, KVP_EINVAL,
                           "'%s' is not a CPU list (numbers or ranges like 0-3, comma-separated)",
                           list);
    return KVP_OK;
}

int kvp_cpus_pin_process(const char *list, kvp_err_t *err) {
    cpu_set_t set;
    int rc = kvp_cpus_check(list, err);
    if (rc) return rc;
    parse(list, &set);
    if (sched_setaffinity(0, sizeof set, &set))
        return kvp_err_set(err, KVP_EINVAL, "cannot pin to CPUs %s: %s", list, strerror(errno));
    DIR *d = opendir("/proc/self/task");
    if (!d) return KVP_OK; /* no /proc: the calling thread and its children are pinned */
    for (struct dirent *e; (e = readdir(d));) {
        pid_t tid = (pid_t)atoi(e->d_name);
        if (tid > 0 && sched_setaffinity(tid, sizeof set, &set)) {
            rc = kvp_err_set(err, KVP_EINVAL, "cannot pin thread %d to CPUs %s: %s", (int)tid,
                             list, strerror(errno));
            break;
        }
    }
    closedir(d);
    return rc;
}

int kvp_cpus_parse_threads3(const char *s, int threads[3]) {
    int v[3], n = 0;
    for (const char *p = s;; p++) {
        char *end;
        long x = strtol(p, &end, 10);
        if (end == p || x < 1 || x > 1024 || n == 3) return -1;
        v[n++] = (int)x;
        p = end;
        if (!*p) break;
        if (*p != ',') return -1;
    }
    if (n != 1 && n != 3) return -1;
    for (int i = 0; i < 3; i++)
        threads[i] = v[n == 1 ? 0 : i];
    return 0;
}

int kvp_cpus_parse_lists3(const char *s, char *buf, size_t n_buf, const char *cpus[3]) {
    if (strlen(s) >= n_buf) return -1;
    strcpy(buf, s);
    char *part[3] = {buf, NULL, NULL};
    int n = 1;
    for (char *q = buf; *q; q++)
        if (*q == '/') {
            if (n == 3) return -1;
            *q = 0;
            part[n++] = q + 1;
        }
    if (n != 1 && n != 3) return -1;
    for (int i = 0; i < 3; i++) {
        cpus[i] = part[n == 1 ? 0 : i];
        kvp_err_t err;
        if (kvp_cpus_check(cpus[i], &err)) return -1;
    }
    return 0;
}
