// llama_logits: llama.cpp's logits for every position of a sequence of token ids, as float32.
// Benchmark-only (vs_llama_cpp.py compiles it on demand against a llama.cpp build; it is no part
// of gpt2s).  Token ids are given directly, so no tokenizer difference can enter the comparison.
//
//   llama_logits MODEL.gguf IDS.txt OUT.f32 [THREADS]
//
// IDS.txt: whitespace-separated token ids (T of them).  OUT.f32: T x n_vocab float32, row t the
// logits after ids[0..t], written in one batch with a context of exactly T positions.
#include "llama.h"

#include <cstdio>
#include <cstdlib>
#include <vector>

static void quiet(enum ggml_log_level level, const char * text, void *) {
    if (level >= GGML_LOG_LEVEL_ERROR) fputs(text, stderr);   // errors only
}

int main(int argc, char ** argv) {
    if (argc < 4 || argc > 5) {
        fprintf(stderr, "usage: %s MODEL.gguf IDS.txt OUT.f32 [THREADS]\n", argv[0]);
        return 2;
    }
    const int threads = argc == 5 ? atoi(argv[4]) : 2;
    std::vector<llama_token> ids;
    FILE * f = fopen(argv[2], "r");
    if (!f) { fprintf(stderr, "cannot open %s\n", argv[2]); return 1; }
    for (int t; fscanf(f, "%d", &t) == 1;) ids.push_back(t);
    fclose(f);
    const int T = (int) ids.size();
    if (T == 0) { fprintf(stderr, "%s: no token ids\n", argv[2]); return 1; }

    llama_log_set(quiet, nullptr);
    llama_backend_init();
    llama_model * model = llama_model_load_from_file(argv[1], llama_model_default_params());
    if (!model) { fprintf(stderr, "cannot load %s\n", argv[1]); return 1; }
    const int n_vocab = llama_vocab_n_tokens(llama_model_get_vocab(model));
    for (int i = 0; i < T; i++) {
        if (ids[i] < 0 || ids[i] >= n_vocab) {
            fprintf(stderr, "token id %d at position %d is outside [0, %d)\n", ids[i], i, n_vocab);
            return 1;
        }
    }

    llama_context_params cp = llama_context_default_params();
    cp.n_ctx = cp.n_batch = cp.n_ubatch = (uint32_t) T;   // the whole sequence in one ubatch
    cp.n_threads = cp.n_threads_batch = threads;
    llama_context * ctx = llama_init_from_model(model, cp);
    if (!ctx) { fprintf(stderr, "cannot create a context of %d positions\n", T); return 1; }

    llama_batch batch = llama_batch_init(T, 0, 1);
    for (int i = 0; i < T; i++) {
        batch.token[i] = ids[i];
        batch.pos[i] = i;
        batch.n_seq_id[i] = 1;
        batch.seq_id[i][0] = 0;
        batch.logits[i] = 1;   // logits for every position, not only the last
    }
    batch.n_tokens = T;
    if (llama_decode(ctx, batch) != 0) { fprintf(stderr, "llama_decode failed\n"); return 1; }

    FILE * out = fopen(argv[3], "wb");
    if (!out) { fprintf(stderr, "cannot write %s\n", argv[3]); return 1; }
    for (int i = 0; i < T; i++) {
        const float * row = llama_get_logits_ith(ctx, i);
        if (!row || fwrite(row, sizeof(float), n_vocab, out) != (size_t) n_vocab) {
            fprintf(stderr, "no logits for position %d\n", i);
            return 1;
        }
    }
    if (fclose(out) != 0) { fprintf(stderr, "cannot write %s\n", argv[3]); return 1; }

    llama_batch_free(batch);
    llama_free(ctx);
    llama_model_free(model);
    llama_backend_free();
    return 0;
}
