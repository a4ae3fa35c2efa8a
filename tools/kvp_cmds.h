/* The kvpred command's subcommands: one file each (tools/cmd_<name>.c).
 * Each takes the arguments after its name (argv[0] is the subcommand name),
 * prints a one-line reason to stderr on bad input and returns the process
 * exit status. */
#ifndef KVP_CMDS_H
#define KVP_CMDS_H

int kvp_cmd_info(int argc, char **argv);
int kvp_cmd_tokenize(int argc, char **argv);
int kvp_cmd_generate(int argc, char **argv);
int kvp_cmd_make_model(int argc, char **argv);
int kvp_cmd_bench(int argc, char **argv);
int kvp_cmd_trace(int argc, char **argv);
int kvp_cmd_train(int argc, char **argv);
int kvp_cmd_models(int argc, char **argv);
int kvp_cmd_plot_loss(int argc, char **argv);
int kvp_cmd_fit_predictor(int argc, char **argv);
int kvp_cmd_train_kvp(int argc, char **argv);
int kvp_cmd_client(int argc, char **argv);
int kvp_cmd_up(int argc, char **argv);
int kvp_cmd_prune(int argc, char **argv);
int kvp_cmd_eval(int argc, char **argv);

#endif
